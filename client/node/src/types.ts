/** The algorithms of protocol version 1 (RFC 7518, RFC 8037, RFC 8812). */
export const ALGORITHMS = [
  "ES256",
  "ES384",
  "ES512",
  "ES256K",
  "RS256",
  "RS384",
  "RS512",
  "PS256",
  "PS384",
  "PS512",
  "EdDSA",
] as const;
export type Alg = (typeof ALGORITHMS)[number];

/** Digest length in bytes per alg; EdDSA signs whole messages only. */
export const DIGEST_BYTES: Readonly<Record<Alg, number | undefined>> = {
  ES256: 32,
  ES384: 48,
  ES512: 64,
  ES256K: 32,
  RS256: 32,
  RS384: 48,
  RS512: 64,
  PS256: 32,
  PS384: 48,
  PS512: 64,
  EdDSA: undefined,
};

/** A public JWK as the agent sends it: str members only, with `kid`, `alg` and `use`. */
export interface Jwk {
  kty: "EC" | "RSA" | "OKP";
  kid: string;
  alg: Alg;
  use: "sig";
  crv?: string;
  x?: string;
  y?: string;
  n?: string;
  e?: string;
  [member: string]: string | undefined;
}

/** Options every call takes. */
export interface CallOptions {
  /** The call's deadline, retries included, in ms (default: the client's `timeoutMs`). The
   * time left is sent to the agent as `timeout_ms`. */
  timeoutMs?: number;
  /** Ends the call early: it rejects with an HsmError `aborted` whose cause is the reason. */
  signal?: AbortSignal;
  /** Attempts for this call (default: the client's `maxAttempts`; 1 disables retries). */
  maxAttempts?: number;
}

/** What `sign`/`verify` sign: a message (bytes, or a string as UTF-8), or a digest. */
export type SignInput = Uint8Array | string | { digest: Uint8Array };

export interface SignOptions extends CallOptions {
  /** Default: the key's alg. */
  alg?: Alg;
  /** ECDSA only: `raw` (JOSE r‖s, the default) or `der`. */
  format?: "raw" | "der";
}

export interface Capabilities {
  protocol: number;
  agentVersion: string;
  canCreate: boolean;
  canImport: boolean;
  canDelete: boolean;
  supportedAlgs: Alg[];
  defaultAlg: Alg;
  maxMessageBytes: number;
}

export interface Health {
  ok: boolean;
  latencyMs: number;
  error: string | null;
  token: { label: string; manufacturer: string; model: string; serial: string };
}

export interface KeyInfo {
  kid: string;
  alg: Alg;
  jwk: Jwk;
}

export interface PublicKey extends KeyInfo {
  /** DER SubjectPublicKeyInfo. */
  spki: Uint8Array;
}

export interface Signature {
  kid: string;
  alg: Alg;
  signature: Uint8Array;
}

export interface Jwks {
  keys: Jwk[];
}

export interface GenerateKeyOptions extends CallOptions {
  /** Default: the agent's `default_alg`. */
  alg?: Alg;
  /** RSA algs only: 2048 (default), 3072 or 4096. */
  rsaBits?: 2048 | 3072 | 4096;
}

export interface SignBatchItem {
  kid: string;
  data?: Uint8Array | string;
  digest?: Uint8Array;
  alg?: Alg;
  format?: "raw" | "der";
}
