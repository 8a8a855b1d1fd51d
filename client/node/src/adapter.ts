import type { JWK } from "jose";
import { HsmClient, type HsmClientOptions } from "./client.js";
import { HsmError } from "./errors.js";
import {
  PublicJwkCache,
  type KmsAdapter,
  type KmsAdapterCapabilities,
  type KmsHealthResult,
  type KmsKeyMaterial,
  type KmsKeyRef,
  type KmsProviderType,
  type KmsSigningAlg,
} from "./kms-types.js";

export interface SidecarAdapterConfig {
  providerId: string;
  /** The sidecar's socket (one sidecar per token; several providers are several sidecars).
   * Default: `$HSM_AGENT_SOCKET`, else /run/hsm-agent/agent.sock. */
  socket?: string;
  /** Further client options (timeouts, retries, limits). */
  client?: Omit<HsmClientOptions, "socketPath">;
  /** Deadline of `health()`, which makes a single attempt. Default 2000 ms. */
  healthTimeoutMs?: number;
}

/** Raised by importKey, as the seed's NotImplementedException (HTTP 501 in a NestJS app). */
export class NotImplementedError extends Error {
  override readonly name = "NotImplementedError";
  readonly status = 501;
  getStatus(): number {
    return this.status;
  }
}

/**
 * The in-process Pkcs11KmsAdapter's replacement: the same public surface and semantics, with
 * the token behind an hsm-agent sidecar. Keys are addressed by kid (the token objects'
 * CKA_LABEL), which is the ref's `externalKeyId`, as before.
 *
 * Differences from the seed, on purpose: every alg the agent's token supports (capabilities
 * come from the agent, after init() or the first call); a duplicate kid is an error
 * (`already_exists`) where the seed made a second key; errors are HsmError with a `code`.
 */
export class SidecarKmsAdapter implements KmsAdapter {
  readonly providerId: string;
  readonly type: KmsProviderType = "pkcs11";
  readonly client: HsmClient;
  readonly jwkCache = new PublicJwkCache();
  #capabilities: KmsAdapterCapabilities = {
    // Until the agent has answered: the seed's values, which every agent can do.
    canCreate: true,
    canImport: false,
    canDelete: true,
    supportedAlgs: ["ES256"],
    defaultAlg: "ES256",
  };
  #initPromise: Promise<void> | undefined;
  readonly #healthTimeoutMs: number;

  constructor(config: SidecarAdapterConfig) {
    this.providerId = config.providerId;
    const options: HsmClientOptions = { ...config.client };
    if (config.socket !== undefined) options.socketPath = config.socket;
    this.client = new HsmClient(options);
    this.#healthTimeoutMs = config.healthTimeoutMs ?? 2000;
  }

  /** The agent's capabilities once init() (or any call) has reached it. */
  get capabilities(): KmsAdapterCapabilities {
    return this.#capabilities;
  }

  /** Asks the agent for its capabilities. Optional: every method does it on first use. A failed
   * init is tried again by the next call. */
  init(): Promise<void> {
    this.#initPromise ??= this.client.capabilities().then(
      (caps) => {
        this.#capabilities = {
          canCreate: caps.canCreate,
          canImport: caps.canImport,
          canDelete: caps.canDelete,
          supportedAlgs: caps.supportedAlgs as KmsSigningAlg[],
          defaultAlg: caps.defaultAlg as KmsSigningAlg,
        };
      },
      (err: unknown) => {
        this.#initPromise = undefined;
        throw err;
      },
    );
    return this.#initPromise;
  }

  async generateKey(opts: { kid: string; alg?: KmsSigningAlg }): Promise<KmsKeyMaterial> {
    await this.init();
    const alg = opts.alg ?? this.#capabilities.defaultAlg;
    this.#assertSupported(alg);
    const key = await this.client.generateKey(opts.kid, { alg });
    const publicJwk = key.jwk as JWK;
    this.jwkCache.set(opts.kid, publicJwk);
    return { ref: { externalKeyId: opts.kid, publicJwk, alg: key.alg as KmsSigningAlg } };
  }

  importKey(_opts: { kid: string; privateJwk: JWK; alg?: KmsSigningAlg }): Promise<KmsKeyMaterial> {
    throw new NotImplementedError(
      `SidecarKmsAdapter[${this.providerId}]: importKey is not supported — generate keys inside the HSM`,
    );
  }

  /** The signature in JOSE form (r‖s for ECDSA), as the seed returned. */
  async sign(ref: KmsKeyRef, data: Uint8Array, alg?: KmsSigningAlg): Promise<Uint8Array> {
    if (!ref.externalKeyId) {
      throw new Error(`SidecarKmsAdapter[${this.providerId}]: missing externalKeyId`);
    }
    await this.init();
    const signAlg = alg ?? ref.alg;
    this.#assertSupported(signAlg);
    return (await this.client.sign(ref.externalKeyId, data, { alg: signAlg })).signature;
  }

  /** Resolves whether or not the key existed, as the seed's did. */
  async deleteKey(ref: KmsKeyRef): Promise<void> {
    if (!ref.externalKeyId) return;
    this.jwkCache.invalidate(ref.externalKeyId);
    await this.client.deleteKey(ref.externalKeyId);
  }

  /** The public JWK of a kid: from the cache, else from the agent (then cached). */
  async getPublicJwk(kid: string): Promise<JWK> {
    const cached = this.jwkCache.get(kid);
    if (cached !== undefined) return cached;
    const jwk = (await this.client.getPublicKey(kid)).jwk as JWK;
    this.jwkCache.set(kid, jwk);
    return jwk;
  }

  /** Asks the token through the agent; never throws. One attempt, bounded by healthTimeoutMs. */
  async health(): Promise<KmsHealthResult> {
    const start = Date.now();
    try {
      const h = await this.client.health({ timeoutMs: this.#healthTimeoutMs, maxAttempts: 1 });
      void this.init().catch(() => {});
      const result: KmsHealthResult = { ok: h.ok, latencyMs: Date.now() - start };
      if (!h.ok) result.error = h.error ?? "the token did not answer";
      return result;
    } catch (err) {
      return { ok: false, latencyMs: Date.now() - start, error: String(err) };
    }
  }

  /** Closes the connection to the agent (pending calls fail with connection_failed). */
  close(): void {
    this.client.close();
  }

  #assertSupported(alg: KmsSigningAlg): void {
    if (!this.#capabilities.supportedAlgs.includes(alg)) {
      throw new HsmError(
        "unsupported_alg",
        `SidecarKmsAdapter[${this.providerId}]: unsupported alg '${alg}'`,
      );
    }
  }
}
