import { HsmError } from "./errors.js";
import { ALGORITHMS, DIGEST_BYTES, type Alg, type SignBatchItem, type SignInput } from "./types.js";

const ALG_NAMES: ReadonlySet<string> = new Set(ALGORITHMS);
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;
const encoder = new TextEncoder();
export const MAX_BATCH_ITEMS = 256;

/**
 * The parameter rules of protocol/README.md that the client can check without the agent, so a
 * bad call fails at once with `invalid_params` (or `unsupported_alg` for a name that is no
 * algorithm of protocol version 1) and nothing is sent. What only the token knows (whether a
 * kid exists, whether it can do an alg) is left to the agent.
 */
export class RequestCheck {
  constructor(private readonly method: string) {}

  fail(name: string, why: string): never {
    throw new HsmError("invalid_params", `${this.method}: ${name} ${why}`);
  }

  /** 1..255 bytes of UTF-8, well-formed (no lone surrogates), no NUL. */
  kid(name: string, kid: unknown): string {
    if (typeof kid !== "string") this.fail(name, "must be a string");
    if (LONE_SURROGATE.test(kid)) this.fail(name, "is not valid Unicode (a lone surrogate)");
    if (kid.includes("\0")) this.fail(name, "must not contain NUL");
    const bytes = Buffer.byteLength(kid, "utf8");
    if (bytes < 1 || bytes > 255) this.fail(name, `must be 1 to 255 bytes of UTF-8, not ${bytes}`);
    return kid;
  }

  alg(name: string, alg: unknown): Alg {
    if (typeof alg !== "string") this.fail(name, "must be a string");
    if (!ALG_NAMES.has(alg)) {
      throw new HsmError(
        "unsupported_alg",
        `${this.method}: unknown alg '${alg}' (one of ${ALGORITHMS.join(", ")})`,
      );
    }
    return alg as Alg;
  }

  bytes(name: string, value: unknown): Uint8Array {
    if (!(value instanceof Uint8Array)) this.fail(name, "must be a Uint8Array");
    return value;
  }

  rsaBits(bits: unknown, alg: Alg | undefined): number {
    if (bits !== 2048 && bits !== 3072 && bits !== 4096)
      this.fail("rsa_bits", "must be 2048, 3072 or 4096");
    if (alg === undefined || !(alg.startsWith("RS") || alg.startsWith("PS"))) {
      this.fail("rsa_bits", "is for RSA algs only (give alg: RS256 .. PS512)");
    }
    return bits;
  }

  /** `data` or `digest` (of the alg's hash length), `alg` and `format`, as wire parameters. */
  signInput(
    prefix: string,
    input: SignInput | undefined,
    options: { alg?: unknown; format?: unknown; digest?: unknown } | undefined,
  ): Record<string, unknown> {
    const params: Record<string, unknown> = {};
    const alg = options?.alg === undefined ? undefined : this.alg(`${prefix}alg`, options.alg);
    if (alg !== undefined) params["alg"] = alg;
    if (typeof input === "string") {
      params["data"] = encoder.encode(input);
    } else if (input instanceof Uint8Array) {
      params["data"] = input;
    } else if (typeof input === "object" && input !== null && "digest" in input) {
      const digest = this.bytes(`${prefix}digest`, input.digest);
      if (alg === "EdDSA")
        this.fail(`${prefix}digest`, "cannot be used with EdDSA (it signs whole messages)");
      const want = alg === undefined ? undefined : DIGEST_BYTES[alg];
      if (want !== undefined ? digest.length !== want : ![32, 48, 64].includes(digest.length)) {
        this.fail(
          `${prefix}digest`,
          `has ${digest.length} bytes, not the alg's hash length (${want ?? "32, 48 or 64"})`,
        );
      }
      params["digest"] = digest;
    } else {
      this.fail(`${prefix}data`, "must be a Uint8Array, a string or { digest }");
    }
    if (options?.format !== undefined) {
      if (options.format !== "raw" && options.format !== "der")
        this.fail(`${prefix}format`, "must be 'raw' or 'der'");
      if (alg !== undefined && !alg.startsWith("ES"))
        this.fail(`${prefix}format`, "is for ECDSA algs only");
      params["format"] = options.format;
    }
    return params;
  }

  batch(items: unknown): Record<string, unknown>[] {
    if (!Array.isArray(items)) this.fail("items", "must be an array");
    if (items.length < 1 || items.length > MAX_BATCH_ITEMS) {
      this.fail("items", `must hold 1 to ${MAX_BATCH_ITEMS} items, not ${items.length}`);
    }
    return items.map((raw: unknown, i) => {
      const prefix = `items[${i}].`;
      if (typeof raw !== "object" || raw === null) this.fail(`items[${i}]`, "must be an object");
      const item = raw as SignBatchItem;
      const hasData = item.data !== undefined;
      const hasDigest = item.digest !== undefined;
      if (hasData === hasDigest) this.fail(`items[${i}]`, "needs exactly one of data and digest");
      const input: SignInput = hasData ? item.data! : { digest: item.digest! };
      return { kid: this.kid(`${prefix}kid`, item.kid), ...this.signInput(prefix, input, item) };
    });
  }
}
