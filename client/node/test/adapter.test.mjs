// SidecarKmsAdapter: the scenarios the in-process adapter's users rely on, against a real agent.
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { createLocalJWKSet, jwtVerify, compactVerify } from "jose";
import {
  HsmClient,
  HsmError,
  NotImplementedError,
  SidecarKmsAdapter,
  agentJwks,
  base64url,
} from "../dist/index.js";
import { startAgent } from "./agent.mjs";

describe("SidecarKmsAdapter", () => {
  let agent;
  let adapter;
  before(async () => {
    agent = await startAgent();
    adapter = new SidecarKmsAdapter({ providerId: "hsm-a", socket: agent.socket });
  });
  after(async () => {
    adapter.close();
    await agent.close();
  });

  it("has the seed's identity; capabilities come from the agent", async () => {
    assert.equal(adapter.providerId, "hsm-a");
    assert.equal(adapter.type, "pkcs11");
    assert.deepEqual(adapter.capabilities.supportedAlgs, ["ES256"]); // before the agent answered
    await adapter.init();
    assert.equal(adapter.capabilities.canImport, false);
    assert.equal(adapter.capabilities.defaultAlg, "ES256");
    assert.ok(
      adapter.capabilities.supportedAlgs.length >= 11,
      adapter.capabilities.supportedAlgs.join(),
    );
  });

  it("generate, sign, verify with jwtVerify through getJwks, for every alg the agent supports", async () => {
    await adapter.init();
    const client = new HsmClient({ socketPath: agent.socket });
    try {
      const tokens = [];
      for (const alg of adapter.capabilities.supportedAlgs) {
        const kid = `contract-${alg}`;
        const { ref } = await adapter.generateKey({ kid, alg });
        assert.deepEqual(
          [ref.externalKeyId, ref.alg, ref.publicJwk.kid, ref.publicJwk.alg],
          [kid, alg, kid, alg],
        );
        assert.equal(adapter.jwkCache.get(kid), ref.publicJwk);
        // The way the app issues a token: its own header and payload, the adapter's signature.
        const signingInput = `${base64url(JSON.stringify({ alg, kid, typ: "JWT" }))}.${base64url(JSON.stringify({ sub: alg }))}`;
        const signature = await adapter.sign(ref, new TextEncoder().encode(signingInput));
        assert.ok(signature instanceof Uint8Array);
        tokens.push([alg, `${signingInput}.${base64url(signature)}`]);
        // and the client's own helper
        tokens.push([alg, await client.signJwt(kid, { sub: alg, iat: 1700000000 })]);
      }
      const jwks = createLocalJWKSet(await client.getJwks());
      const remoteLike = agentJwks(client);
      for (const [alg, token] of tokens) {
        const { payload, protectedHeader } = await jwtVerify(token, jwks);
        assert.equal(payload.sub, alg);
        assert.equal(protectedHeader.alg, alg);
        await jwtVerify(token, remoteLike);
      }
      // ECDSA signatures are JOSE r‖s, as the seed returned: 64 bytes for ES256.
      const es256 = tokens.find(([alg]) => alg === "ES256")[1];
      assert.equal(Buffer.from(es256.split(".")[2], "base64url").length, 64);
    } finally {
      client.close();
    }
  });

  it("the JWKS source picks up a key generated after its first fetch", async () => {
    const client = new HsmClient({ socketPath: agent.socket });
    try {
      const source = agentJwks(client, { cooldownMs: 0 });
      await client.generateKey("jwks-first");
      await compactVerify(await client.signJws("jwks-first", "one"), source);
      await client.generateKey("jwks-later");
      await compactVerify(await client.signJws("jwks-later", "two"), source);
      assert.ok(source.jwks().keys.some((k) => k.kid === "jwks-later"));
    } finally {
      client.close();
    }
  });

  it("a duplicate kid is already_exists (the seed made a second key)", async () => {
    await adapter.generateKey({ kid: "dup" });
    await assert.rejects(
      adapter.generateKey({ kid: "dup" }),
      (err) => err instanceof HsmError && err.code === "already_exists",
    );
  });

  it("delete then sign is not_found; deleting an absent key resolves; the JWK cache forgets it", async () => {
    const { ref } = await adapter.generateKey({ kid: "doomed", alg: "ES384" });
    assert.deepEqual(await adapter.getPublicJwk("doomed"), ref.publicJwk);
    await adapter.deleteKey(ref);
    assert.equal(adapter.jwkCache.get("doomed"), undefined);
    await assert.rejects(
      adapter.sign(ref, new Uint8Array([1])),
      (err) => err instanceof HsmError && err.code === "not_found",
    );
    await adapter.deleteKey(ref); // absent: still resolves
    await adapter.deleteKey({ publicJwk: {}, alg: "ES256" }); // no externalKeyId: nothing to do
  });

  it("sign without externalKeyId and an alg the agent lacks fail like the seed's", async () => {
    await assert.rejects(
      adapter.sign({ publicJwk: {}, alg: "ES256" }, new Uint8Array([1])),
      /hsm-a\]: missing externalKeyId/,
    );
    await assert.rejects(
      adapter.sign({ externalKeyId: "x", publicJwk: {}, alg: "HS256" }, new Uint8Array([1])),
      /unsupported alg 'HS256'/,
    );
  });

  it("importKey throws the seed's not-implemented error", () => {
    assert.throws(
      () => adapter.importKey({ kid: "i", privateJwk: {} }),
      (err) =>
        err instanceof NotImplementedError &&
        err.getStatus() === 501 &&
        err.message ===
          "SidecarKmsAdapter[hsm-a]: importKey is not supported — generate keys inside the HSM",
    );
  });

  it("health touches the token; on a stopped agent it is {ok: false} without throwing", async () => {
    const healthy = await adapter.health();
    assert.equal(healthy.ok, true);
    assert.equal(typeof healthy.latencyMs, "number");
    assert.equal(healthy.error, undefined);
    await agent.stop();
    const down = await adapter.health();
    assert.equal(down.ok, false);
    assert.match(down.error, /connection_failed|cannot connect|lost/);
    const never = new SidecarKmsAdapter({
      providerId: "nobody",
      socket: `${agent.token.dir}/none.sock`,
    });
    assert.equal((await never.health()).ok, false);
    never.close();
  });
});
