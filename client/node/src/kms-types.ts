import type { JWK } from "jose";

/**
 * The KmsAdapter contract of the application this package grew out of (its kms-adapter.ts, as
 * the in-process Pkcs11KmsAdapter uses it), so the app's provider registry takes a
 * SidecarKmsAdapter where it took a Pkcs11KmsAdapter. Structural: the app's own declarations of
 * these types match these.
 */
export type KmsProviderType = "pkcs11" | (string & {});

export type KmsSigningAlg =
  | "ES256"
  | "ES384"
  | "ES512"
  | "ES256K"
  | "RS256"
  | "RS384"
  | "RS512"
  | "PS256"
  | "PS384"
  | "PS512"
  | "EdDSA";

export interface KmsAdapterCapabilities {
  canCreate: boolean;
  canImport: boolean;
  canDelete: boolean;
  supportedAlgs: KmsSigningAlg[];
  defaultAlg: KmsSigningAlg;
}

export interface KmsKeyRef {
  /** The key's id at the provider: for the sidecar, the kid (the token object's CKA_LABEL). */
  externalKeyId?: string;
  publicJwk: JWK;
  alg: KmsSigningAlg;
}

export interface KmsKeyMaterial {
  ref: KmsKeyRef;
}

export interface KmsHealthResult {
  ok: boolean;
  latencyMs: number;
  error?: string;
}

export interface KmsAdapter {
  readonly providerId: string;
  readonly type: KmsProviderType;
  readonly capabilities: KmsAdapterCapabilities;
  generateKey(opts: { kid: string; alg?: KmsSigningAlg }): Promise<KmsKeyMaterial>;
  importKey(opts: { kid: string; privateJwk: JWK; alg?: KmsSigningAlg }): Promise<KmsKeyMaterial>;
  sign(ref: KmsKeyRef, data: Uint8Array, alg?: KmsSigningAlg): Promise<Uint8Array>;
  deleteKey(ref: KmsKeyRef): Promise<void>;
  health(): Promise<KmsHealthResult>;
}

/** Public JWKs by kid (the seed's PublicJwkCache): filled by generateKey, emptied by deleteKey. */
export class PublicJwkCache {
  readonly #entries = new Map<string, JWK>();

  get(kid: string): JWK | undefined {
    return this.#entries.get(kid);
  }

  set(kid: string, jwk: JWK): void {
    this.#entries.set(kid, jwk);
  }

  invalidate(kid: string): void {
    this.#entries.delete(kid);
  }

  clear(): void {
    this.#entries.clear();
  }
}
