import {
  createLocalJWKSet,
  errors,
  type FlattenedJWSInput,
  type JSONWebKeySet,
  type JWSHeaderParameters,
  type KeyLike,
} from "jose";
import type { HsmClient } from "./client.js";

export interface AgentJwksOptions {
  /** A JWKS older than this is fetched again before use. Default 60 000 ms. */
  cacheMaxAgeMs?: number;
  /** After a fetch, a token with an unknown kid does not cause another for this long.
   * Default 1000 ms (the agent is local: a fetch is cheap, and a new key shows up soon). */
  cooldownMs?: number;
}

/** The shape of jose's createRemoteJWKSet result, so code written for it takes this too. */
export interface AgentJwks {
  (protectedHeader?: JWSHeaderParameters, token?: FlattenedJWSInput): Promise<KeyLike>;
  readonly coolingDown: boolean;
  readonly fresh: boolean;
  readonly reloading: boolean;
  reload(): Promise<void>;
  jwks(): JSONWebKeySet | undefined;
}

/**
 * A JWKS source for jose's `jwtVerify`/`compactVerify`, fed by the agent's `get_jwks` instead of
 * an HTTP URL: `jwtVerify(token, agentJwks(client))`. It caches the set, refetches it when it is
 * older than `cacheMaxAgeMs`, and once per `cooldownMs` when a token names a kid it lacks (a key
 * generated since). Errors are jose's (`JWKSNoMatchingKey`, ...) or the client's HsmError.
 */
export function agentJwks(client: HsmClient, options: AgentJwksOptions = {}): AgentJwks {
  const cacheMaxAgeMs = options.cacheMaxAgeMs ?? 60_000;
  const cooldownMs = options.cooldownMs ?? 1000;
  let set: JSONWebKeySet | undefined;
  let local: ReturnType<typeof createLocalJWKSet> | undefined;
  let fetchedAt = -Infinity;
  let pending: Promise<void> | undefined;

  const reload = (): Promise<void> => {
    pending ??= client
      .getJwks()
      .then((jwks) => {
        set = jwks as unknown as JSONWebKeySet;
        local = createLocalJWKSet(set);
        fetchedAt = Date.now();
      })
      .finally(() => {
        pending = undefined;
      });
    return pending;
  };

  const source = async (
    protectedHeader?: JWSHeaderParameters,
    token?: FlattenedJWSInput,
  ): Promise<KeyLike> => {
    if (local === undefined || Date.now() - fetchedAt >= cacheMaxAgeMs) await reload();
    try {
      return await local!(protectedHeader, token);
    } catch (err) {
      if (!(err instanceof errors.JWKSNoMatchingKey) || Date.now() - fetchedAt < cooldownMs)
        throw err;
      await reload();
      return local!(protectedHeader, token);
    }
  };
  return Object.defineProperties(source, {
    coolingDown: { get: () => Date.now() - fetchedAt < cooldownMs },
    fresh: { get: () => Date.now() - fetchedAt < cacheMaxAgeMs },
    reloading: { get: () => pending !== undefined },
    reload: { value: reload },
    jwks: { value: () => set },
  }) as AgentJwks;
}
