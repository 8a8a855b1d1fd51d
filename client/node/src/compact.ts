import { HsmError } from "./errors.js";
import type { Alg } from "./types.js";

const encoder = new TextEncoder();

export function base64url(bytes: Uint8Array | string): string {
  return Buffer.from(typeof bytes === "string" ? encoder.encode(bytes) : bytes).toString(
    "base64url",
  );
}

/**
 * A compact JWS (RFC 7515 §7.1): the header with `alg` and `kid` first, then the caller's
 * members; a caller's `alg` or `kid` that differs from the key's is refused, not overwritten.
 * `sign` signs the signing input in the token; its raw signature (JOSE r‖s for ECDSA) is the
 * JWS signature.
 */
export async function signCompact(
  kid: string,
  alg: Alg,
  header: Record<string, unknown>,
  payload: Uint8Array | string,
  sign: (input: Uint8Array) => Promise<Uint8Array>,
): Promise<string> {
  if (typeof header !== "object" || header === null || Array.isArray(header)) {
    throw new HsmError("jose_malformed", "the JWS header must be an object");
  }
  if (header["alg"] !== undefined && header["alg"] !== alg) {
    throw new HsmError(
      "jose_alg_mismatch",
      `header alg '${String(header["alg"])}' is not the key's alg '${alg}'`,
    );
  }
  if (header["kid"] !== undefined && header["kid"] !== kid) {
    throw new HsmError(
      "jose_kid_mismatch",
      `header kid '${String(header["kid"])}' is not '${kid}'`,
    );
  }
  const { alg: _a, kid: _k, ...rest } = header;
  const signingInput = `${base64url(JSON.stringify({ alg, kid, ...rest }))}.${base64url(payload)}`;
  const signature = await sign(encoder.encode(signingInput));
  return `${signingInput}.${base64url(signature)}`;
}
