/**
 * The one error type of this package. `code` is one of the protocol's error codes
 * (protocol/README.md, "Errors"), or one of the codes this side of the socket adds:
 * `connection_failed` (cannot reach the agent, or the connection was lost with the call in
 * flight), `timeout` (no answer within the call's deadline), `aborted` (the caller's AbortSignal
 * fired; `cause` is the signal's reason), `protocol_error` (the agent's answer broke the
 * protocol or a client limit) and the `jose_*` codes of the JOSE helpers.
 */
export type ProtocolErrorCode =
  | "invalid_request"
  | "unknown_method"
  | "invalid_params"
  | "not_found"
  | "already_exists"
  | "unsupported_alg"
  | "not_supported"
  | "permission_denied"
  | "hsm_unavailable"
  | "hsm_error"
  | "overloaded"
  | "shutting_down"
  | "deadline_exceeded"
  | "audit_unavailable"
  | "internal";

export type ClientErrorCode = "connection_failed" | "timeout" | "aborted" | "protocol_error";

export type JoseErrorCode = "jose_malformed" | "jose_alg_mismatch" | "jose_kid_mismatch";

export type HsmErrorCode = ProtocolErrorCode | ClientErrorCode | JoseErrorCode;

const PROTOCOL_CODES: ReadonlySet<string> = new Set<ProtocolErrorCode>([
  "invalid_request",
  "unknown_method",
  "invalid_params",
  "not_found",
  "already_exists",
  "unsupported_alg",
  "not_supported",
  "permission_denied",
  "hsm_unavailable",
  "hsm_error",
  "overloaded",
  "shutting_down",
  "deadline_exceeded",
  "audit_unavailable",
  "internal",
]);

/** Agent codes that say "not now" rather than "no": the same request may succeed later. */
const TRANSIENT_CODES: ReadonlySet<string> = new Set<HsmErrorCode>([
  "hsm_unavailable",
  "overloaded",
  "shutting_down",
  "audit_unavailable",
]);

export class HsmError extends Error {
  override readonly name = "HsmError";
  readonly code: HsmErrorCode;
  /** The PKCS#11 return value's name (`"CKR_DEVICE_ERROR"`) when a token call failed. */
  readonly ckr: string | undefined;

  constructor(code: HsmErrorCode, message: string, options?: { ckr?: string; cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.ckr = options?.ckr;
  }

  /** True for the codes after which the same request may succeed later. */
  get transient(): boolean {
    return TRANSIENT_CODES.has(this.code) || this.code === "connection_failed";
  }
}

/**
 * The `error` map of a response, as an HsmError. A code this client does not know is treated
 * like `internal` (as hsm::protocol does), keeping the unknown code in the message.
 */
export function errorFromWire(error: unknown): HsmError {
  if (typeof error !== "object" || error === null) {
    return new HsmError("protocol_error", "the agent's error is not a map");
  }
  const { code, message, ckr } = error as Record<string, unknown>;
  const text = typeof message === "string" ? message : "";
  const options = typeof ckr === "string" ? { ckr } : undefined;
  if (typeof code !== "string") {
    return new HsmError("protocol_error", "the agent's error has no code");
  }
  if (!PROTOCOL_CODES.has(code)) {
    return new HsmError("internal", `unknown error code '${code}': ${text}`, options);
  }
  return new HsmError(code as ProtocolErrorCode, text, options);
}

export function isTransientAgentCode(code: string): boolean {
  return TRANSIENT_CODES.has(code);
}
