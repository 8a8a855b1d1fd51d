import { performance } from "node:perf_hooks";
import { Encoder } from "@msgpack/msgpack";
import { Call } from "./call.js";
import { AttemptFailure, Connection, type Answer } from "./connection.js";
import { HsmError, errorFromWire, isTransientAgentCode } from "./errors.js";
import type { FrameLimits } from "./framing.js";
import { RequestCheck } from "./params.js";
import type {
  Alg,
  CallOptions,
  Capabilities,
  GenerateKeyOptions,
  Health,
  Jwk,
  Jwks,
  KeyInfo,
  PublicKey,
  SignBatchItem,
  SignInput,
  SignOptions,
  Signature,
} from "./types.js";
import { signCompact } from "./compact.js";

export const DEFAULT_SOCKET = "/run/hsm-agent/agent.sock";

export interface HsmClientOptions {
  /** The agent's socket. Default: `$HSM_AGENT_SOCKET`, else /run/hsm-agent/agent.sock. */
  socketPath?: string;
  /** Per call, retries included; also sent to the agent as `timeout_ms`. Default 5000. */
  timeoutMs?: number;
  /** Attempts per call (1 disables retries). Default 16. */
  maxAttempts?: number;
  /** Capped exponential backoff between attempts and between failed connects, jittered in
   * [d/2, d]. Defaults 10 and 1000 ms. */
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  /** Larger requests fail with `invalid_params` without being sent. Default 1 MiB (keep it at
   * the agent's --max-message-bytes). */
  maxRequestBytes?: number;
  /** A larger answer closes the connection (`protocol_error`). Default 16 MiB. */
  maxResponseBytes?: number;
}

export type SignBatchResult = { signature: Uint8Array } | { error: HsmError };

/** Methods that only read keys: safe to send twice (protocol/README.md, "msgid"). */
const IDEMPOTENT = new Set([
  "capabilities",
  "health",
  "sign",
  "sign_batch",
  "verify",
  "get_public_key",
  "list_keys",
  "get_jwks",
]);

const MAX_TIMEOUT_MS = 4294967295;

/**
 * A client of hsm-agent (protocol/README.md). One pipelined connection, opened on first use and
 * reopened on demand after the agent goes away; answers are matched by msgid, in any order.
 *
 * Every call has a deadline (`timeoutMs`) that covers its retries, and takes an AbortSignal.
 * Retries follow hsm::client's rules: `capabilities`, `health`, `sign`, `sign_batch`, `verify`,
 * `get_public_key`, `list_keys` and `get_jwks` are retried within their deadline when the
 * connection is lost or the agent answers `hsm_unavailable`, `overloaded`, `shutting_down` or
 * `audit_unavailable`; `generate_key` and `delete_key` only when the request certainly never
 * left this process (the agent could not be reached).
 *
 * Every rejection is an HsmError. Safe to share within the process; make one per agent.
 */
export class HsmClient {
  readonly socketPath: string;
  readonly #timeoutMs: number;
  readonly #maxAttempts: number;
  readonly #initialBackoffMs: number;
  readonly #maxBackoffMs: number;
  readonly #maxRequestBytes: number;
  readonly #limits: FrameLimits;
  readonly #encoder = new Encoder({ ignoreUndefined: true });
  readonly #calls = new Set<Call>();
  readonly #keyAlgs = new Map<string, Alg>();
  #connection: Connection | undefined;
  #connecting: Promise<Connection> | undefined;
  #connectFailures = 0;
  #nextConnectAt = 0;
  #closed = false;

  constructor(options: HsmClientOptions = {}) {
    // An empty HSM_AGENT_SOCKET counts as unset, as for the C++ client.
    this.socketPath = options.socketPath || process.env["HSM_AGENT_SOCKET"] || DEFAULT_SOCKET;
    this.#timeoutMs = positive("timeoutMs", options.timeoutMs ?? 5000, MAX_TIMEOUT_MS);
    this.#maxAttempts = positive("maxAttempts", options.maxAttempts ?? 16, 1_000_000);
    this.#initialBackoffMs = Math.max(0.1, options.initialBackoffMs ?? 10);
    this.#maxBackoffMs = Math.max(this.#initialBackoffMs, options.maxBackoffMs ?? 1000);
    this.#maxRequestBytes = positive(
      "maxRequestBytes",
      options.maxRequestBytes ?? 1 << 20,
      2 ** 32,
    );
    const maxResponseBytes = positive(
      "maxResponseBytes",
      options.maxResponseBytes ?? 16 << 20,
      2 ** 32,
    );
    this.#limits = {
      maxMessageBytes: maxResponseBytes,
      maxDepth: 8,
      maxArrayItems: 1 << 20, // list_keys, get_jwks: one entry per key; the byte cap bounds them
      maxMapEntries: 64,
      maxStrBytes: 64 << 10,
    };
  }

  // --- the protocol's methods ----------------------------------------------------------------

  async capabilities(options?: CallOptions): Promise<Capabilities> {
    const r = await this.#call("capabilities", {}, options);
    return {
      protocol: num(r, "protocol"),
      agentVersion: str(r, "agent_version"),
      canCreate: bool(r, "can_create"),
      canImport: bool(r, "can_import"),
      canDelete: bool(r, "can_delete"),
      supportedAlgs: list(r, "supported_algs") as Alg[],
      defaultAlg: str(r, "default_alg") as Alg,
      maxMessageBytes: num(r, "max_message_bytes"),
    };
  }

  /** Asks the token (`C_GetTokenInfo`); `ok: false` is an answer, not an error. */
  async health(options?: CallOptions): Promise<Health> {
    const r = await this.#call("health", {}, options);
    const token = (r["token"] ?? {}) as Record<string, unknown>;
    const text = (k: string) => (typeof token[k] === "string" ? (token[k] as string) : "");
    return {
      ok: bool(r, "ok"),
      latencyMs: num(r, "latency_ms"),
      error: typeof r["error"] === "string" ? r["error"] : null,
      token: {
        label: text("label"),
        manufacturer: text("manufacturer"),
        model: text("model"),
        serial: text("serial"),
      },
    };
  }

  /** Creates a key pair inside the token. A kid that exists is `already_exists`. */
  async generateKey(kid: string, options?: GenerateKeyOptions): Promise<KeyInfo> {
    const check = new RequestCheck("generate_key");
    const params: Record<string, unknown> = { kid: check.kid("kid", kid) };
    if (options?.alg !== undefined) params["alg"] = check.alg("alg", options.alg);
    if (options?.rsaBits !== undefined)
      params["rsa_bits"] = check.rsaBits(options.rsaBits, options.alg);
    const r = await this.#call("generate_key", params, options);
    return this.#rememberKey(keyInfo(r));
  }

  /** Signs in the token. ECDSA signatures are JOSE r‖s unless `format: "der"`. */
  async sign(kid: string, input: SignInput, options?: SignOptions): Promise<Signature> {
    const check = new RequestCheck("sign");
    const params = { kid: check.kid("kid", kid), ...check.signInput("", input, options) };
    const r = await this.#call("sign", params, options);
    return { kid: str(r, "kid"), alg: str(r, "alg") as Alg, signature: bin(r, "signature") };
  }

  /** Up to 256 signatures in one request; each item succeeds or fails on its own. */
  async signBatch(items: SignBatchItem[], options?: CallOptions): Promise<SignBatchResult[]> {
    const check = new RequestCheck("sign_batch");
    const wire = check.batch(items);
    const r = await this.#call("sign_batch", { items: wire }, options);
    const results = r["results"];
    if (!Array.isArray(results) || results.length !== items.length) {
      throw new HsmError(
        "protocol_error",
        "sign_batch: the agent's results do not match the items",
      );
    }
    return results.map((item: unknown): SignBatchResult => {
      const entry = (item ?? {}) as Record<string, unknown>;
      if (entry["signature"] instanceof Uint8Array) return { signature: entry["signature"] };
      return { error: errorFromWire(entry["error"]) };
    });
  }

  /** True when `signature` is valid; a wrong signature is `false`, not an error. */
  async verify(
    kid: string,
    input: SignInput,
    signature: Uint8Array,
    options?: SignOptions,
  ): Promise<boolean> {
    const check = new RequestCheck("verify");
    const params = {
      kid: check.kid("kid", kid),
      ...check.signInput("", input, options),
      signature: check.bytes("signature", signature),
    };
    const r = await this.#call("verify", params, options);
    return bool(r, "valid");
  }

  async getPublicKey(kid: string, options?: CallOptions): Promise<PublicKey> {
    const check = new RequestCheck("get_public_key");
    const r = await this.#call("get_public_key", { kid: check.kid("kid", kid) }, options);
    return { ...this.#rememberKey(keyInfo(r)), spki: bin(r, "spki") };
  }

  async listKeys(options?: CallOptions): Promise<KeyInfo[]> {
    const r = await this.#call("list_keys", {}, options);
    const keys = r["keys"];
    if (!Array.isArray(keys)) throw new HsmError("protocol_error", "list_keys: no keys array");
    return keys.map((k) => keyInfo((k ?? {}) as Record<string, unknown>));
  }

  /** A JWK Set of every key, ready to publish as /.well-known/jwks.json (JSON.stringify it). */
  async getJwks(options?: CallOptions): Promise<Jwks> {
    const r = await this.#call("get_jwks", {}, options);
    const keys = r["keys"];
    if (!Array.isArray(keys)) throw new HsmError("protocol_error", "get_jwks: no keys array");
    return { keys: keys as Jwk[] };
  }

  /** True when the key pair was removed, false when there was no such kid. */
  async deleteKey(kid: string, options?: CallOptions): Promise<boolean> {
    const check = new RequestCheck("delete_key");
    const params = { kid: check.kid("kid", kid) };
    this.#keyAlgs.delete(kid);
    const r = await this.#call("delete_key", params, options);
    return bool(r, "deleted");
  }

  // --- JOSE ----------------------------------------------------------------------------------

  /**
   * A compact JWS over `payload`, signed in the token. The header gets the key's `alg` and the
   * `kid` first; a caller's `alg` or `kid` that differs is refused (`jose_alg_mismatch`,
   * `jose_kid_mismatch`), not overwritten. The key's alg is fetched once per kid and cached.
   */
  async signJws(
    kid: string,
    payload: Uint8Array | string,
    header: Record<string, unknown> = {},
    options?: CallOptions,
  ): Promise<string> {
    const alg = await this.#keyAlg(kid, options);
    return signCompact(kid, alg, header, payload, (input) =>
      this.sign(kid, input, { ...options, alg }).then((s) => s.signature),
    );
  }

  /** A JWT: `claims` (a JSON object) as the payload, `typ: "JWT"` unless the header says. */
  async signJwt(
    kid: string,
    claims: Record<string, unknown>,
    header: Record<string, unknown> = {},
    options?: CallOptions,
  ): Promise<string> {
    if (typeof claims !== "object" || claims === null || Array.isArray(claims)) {
      throw new HsmError("jose_malformed", "signJwt: the claims must be an object");
    }
    return this.signJws(kid, JSON.stringify(claims), { typ: "JWT", ...header }, options);
  }

  // --- lifecycle -----------------------------------------------------------------------------

  /** Fails every pending call with `connection_failed` ("the client is closed") and closes the
   * connection. Later calls fail the same way. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    const error = new HsmError("connection_failed", "the client is closed");
    for (const call of [...this.#calls]) call.finish(error);
    this.#connection?.close(error);
    this.#connection = undefined;
  }

  /** Calls in progress (waiting for an answer, a connection or a retry). */
  get pendingCalls(): number {
    return this.#calls.size;
  }

  /** Requests on the wire without an answer yet. */
  get inFlight(): number {
    return this.#connection?.inFlight ?? 0;
  }

  // --- machinery -----------------------------------------------------------------------------

  async #keyAlg(kid: string, options?: CallOptions): Promise<Alg> {
    const known = this.#keyAlgs.get(kid);
    if (known !== undefined) return known;
    return (await this.getPublicKey(kid, options)).alg;
  }

  #rememberKey(key: KeyInfo): KeyInfo {
    this.#keyAlgs.set(key.kid, key.alg);
    return key;
  }

  /**
   * One call: attempts until an answer that is not retried, the deadline, the caller's abort,
   * or close() (see Call). Callbacks, not an async chain: at 64 calls in flight the client's own
   * CPU time per call decides its throughput.
   */
  #call(
    method: string,
    params: Record<string, unknown>,
    options?: CallOptions,
  ): Promise<Record<string, unknown>> {
    const timeoutMs = positive("timeoutMs", options?.timeoutMs ?? this.#timeoutMs, MAX_TIMEOUT_MS);
    const maxAttempts = positive(
      "maxAttempts",
      options?.maxAttempts ?? this.#maxAttempts,
      1_000_000,
    );
    if (this.#closed) throw new HsmError("connection_failed", "the client is closed");
    const signal = options?.signal;
    if (signal?.aborted)
      throw new HsmError("aborted", `${method}: aborted`, { cause: signal.reason });
    return new Promise((resolve, reject) => {
      const call = new Call(
        method,
        params,
        IDEMPOTENT.has(method),
        maxAttempts,
        performance.now() + timeoutMs,
        timeoutMs,
        signal,
        resolve,
        reject,
        this.#onAttempt,
        this.#onFinish,
      );
      this.#calls.add(call);
      this.#attempt(call);
    });
  }

  readonly #onFinish = (call: Call): void => {
    this.#calls.delete(call);
  };

  /** Sends the call on the open connection, or once one is open. */
  #attempt(call: Call): void {
    call.retryTimer = undefined;
    if (call.done) return;
    if (this.#closed) {
      call.finish(new HsmError("connection_failed", "the client is closed"));
      return;
    }
    call.attempts += 1;
    const connection = this.#connection;
    if (connection !== undefined && !connection.closed) {
      this.#send(call, connection);
      return;
    }
    this.#connect().then(
      (opened) => {
        if (!call.done) this.#send(call, opened);
      },
      (failure: AttemptFailure) => {
        if (!call.done)
          this.#retryOrFinish(call, failure.error, failure.maybeSent, failure.notBefore);
      },
    );
  }

  #send(call: Call, connection: Connection): void {
    const msgid = connection.nextMsgid();
    const remaining = Math.max(1, Math.ceil(call.deadline - performance.now()));
    const params = { ...call.params, timeout_ms: remaining };
    const bytes = this.#encoder.encode([0, msgid, call.method, [params]]);
    if (bytes.length > this.#maxRequestBytes) {
      call.finish(
        new HsmError(
          "invalid_params",
          `${call.method}: the request is ${bytes.length} bytes, more than ${this.#maxRequestBytes}`,
        ),
      );
      return;
    }
    if (!connection.send(msgid, bytes, call)) {
      // Closed since it was handed out: nothing left, so this is reconnecting, not retrying.
      call.attempts -= 1;
      this.#attempt(call);
      return;
    }
    call.inFlight = { connection, msgid };
  }

  readonly #onAttempt = (call: Call, outcome: Answer | AttemptFailure | HsmError): void => {
    if (outcome instanceof HsmError) {
      call.finish(outcome);
    } else if (outcome instanceof AttemptFailure) {
      this.#retryOrFinish(call, outcome.error, outcome.maybeSent, 0);
    } else if (outcome.error !== null && outcome.error !== undefined) {
      const error = errorFromWire(outcome.error);
      if (isTransientAgentCode(error.code)) this.#retryOrFinish(call, error, true, 0);
      else call.finish(error);
    } else if (
      typeof outcome.result !== "object" ||
      outcome.result === null ||
      Array.isArray(outcome.result)
    ) {
      call.finish(new HsmError("protocol_error", `${call.method}: the result is not a map`));
    } else {
      call.finish(outcome.result as Record<string, unknown>);
    }
  };

  /**
   * A request that never left may be sent again whatever it does; one that may have reached the
   * agent only if doing it twice is harmless (never generate_key or delete_key).
   */
  #retryOrFinish(call: Call, error: HsmError, maybeSent: boolean, notBefore: number): void {
    const retryable =
      (error.code === "connection_failed" || isTransientAgentCode(error.code)) &&
      (!maybeSent || call.idempotent);
    if (!retryable || call.attempts >= call.maxAttempts || this.#closed) {
      call.finish(error);
      return;
    }
    const now = performance.now();
    const at = Math.max(now + this.#backoff(call.attempts), notBefore);
    if (at >= call.deadline) {
      call.finish(error); // a retry could not finish in time: report the cause now
      return;
    }
    call.lastFailure = error;
    call.retryTimer = setTimeout(() => this.#attempt(call), at - now);
  }

  /** The connection being opened, or a new one; a failed connect gates the next by the backoff.
   * Rejects with an AttemptFailure (never sent). */
  #connect(): Promise<Connection> {
    if (this.#connecting !== undefined) return this.#connecting;
    const now = performance.now();
    if (now < this.#nextConnectAt) {
      return Promise.reject(
        new AttemptFailure(
          new HsmError(
            "connection_failed",
            `cannot connect to the agent at ${this.socketPath} (retrying)`,
          ),
          false,
          this.#nextConnectAt,
        ),
      );
    }
    // Shared by every call waiting for it, so not bound to one call's deadline; a connect that
    // hangs ends after the client's timeout (an unref'd timer: it keeps nothing alive).
    this.#connecting = Connection.open(
      this.socketPath,
      this.#limits,
      AbortSignal.timeout(this.#timeoutMs),
      (c) => {
        if (this.#connection === c) this.#connection = undefined;
      },
    ).then(
      (connection) => {
        this.#connecting = undefined;
        this.#connectFailures = 0;
        if (this.#closed) {
          connection.close(new HsmError("connection_failed", "the client is closed"));
          throw new AttemptFailure(
            new HsmError("connection_failed", "the client is closed"),
            false,
          );
        }
        this.#connection = connection;
        return connection;
      },
      (err: unknown) => {
        this.#connecting = undefined;
        this.#connectFailures += 1;
        this.#nextConnectAt = performance.now() + this.#backoff(this.#connectFailures);
        const error =
          err instanceof HsmError
            ? err
            : new HsmError(
                "connection_failed",
                `cannot connect to the agent at ${this.socketPath}`,
                { cause: err },
              );
        throw new AttemptFailure(error, false, this.#nextConnectAt);
      },
    );
    return this.#connecting;
  }

  /** Capped exponential backoff, jittered in [d/2, d] (hsm::client's Backoff). */
  #backoff(attempt: number): number {
    const ceiling = Math.min(
      this.#initialBackoffMs * 2 ** Math.min(attempt - 1, 30),
      this.#maxBackoffMs,
    );
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }
}

function positive(name: string, value: number, max: number): number {
  if (!Number.isInteger(value) || value < 1 || value > max) {
    throw new HsmError(
      "invalid_params",
      `${name} must be an integer from 1 to ${max}, not ${String(value)}`,
    );
  }
  return value;
}

// Result fields: the agent's result maps are open (unknown keys ignored) but the known ones must
// have their types, else the answer is a protocol_error.
function field(
  r: Record<string, unknown>,
  key: string,
  type: string,
  ok: (v: unknown) => boolean,
): unknown {
  const v = r[key];
  if (!ok(v)) throw new HsmError("protocol_error", `the agent's result has no ${type} '${key}'`);
  return v;
}
const str = (r: Record<string, unknown>, k: string) =>
  field(r, k, "str", (v) => typeof v === "string") as string;
const num = (r: Record<string, unknown>, k: string) =>
  field(r, k, "number", (v) => typeof v === "number") as number;
const bool = (r: Record<string, unknown>, k: string) =>
  field(r, k, "bool", (v) => typeof v === "boolean") as boolean;
const bin = (r: Record<string, unknown>, k: string) =>
  field(r, k, "bin", (v) => v instanceof Uint8Array) as Uint8Array;
const list = (r: Record<string, unknown>, k: string) =>
  field(r, k, "array", Array.isArray) as unknown[];
const keyInfo = (r: Record<string, unknown>): KeyInfo => ({
  kid: str(r, "kid"),
  alg: str(r, "alg") as Alg,
  jwk: field(r, "jwk", "map", (v) => typeof v === "object" && v !== null) as Jwk,
});
