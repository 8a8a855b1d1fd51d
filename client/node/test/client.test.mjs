// HsmClient against a real hsm-agent on a SoftHSMv2 token: every method, every error code the
// client can meet, and the parameter checks that refuse a call before anything is sent.
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { createHash, createPublicKey, verify as cryptoVerify } from "node:crypto";
import { createServer } from "node:net";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { Decoder, encode } from "@msgpack/msgpack";
import { HsmClient, HsmError } from "../dist/index.js";
import { Agent, SoftHsmToken, faultModule, startAgent } from "./agent.mjs";
import { RecordingProxy } from "./proxy.mjs";

/** Asserts that `promise` rejects with an HsmError of `code`. */
async function rejectsWith(promise, code) {
  await assert.rejects(promise, (err) => {
    assert.ok(err instanceof HsmError, `not an HsmError: ${err}`);
    assert.equal(err.code, code, `${err.code}: ${err.message}`);
    return true;
  });
}

describe("HsmClient methods", () => {
  let agent;
  let client;
  before(async () => {
    agent = await startAgent();
    client = new HsmClient({ socketPath: agent.socket });
  });
  after(async () => {
    client.close();
    await agent.close();
  });

  it("capabilities lists every alg and the limits", async () => {
    const caps = await client.capabilities();
    assert.equal(caps.protocol, 1);
    assert.equal(caps.canCreate, true);
    assert.equal(caps.canImport, false);
    assert.equal(caps.defaultAlg, "ES256");
    assert.ok(caps.supportedAlgs.includes("EdDSA") && caps.supportedAlgs.includes("PS512"));
    assert.equal(caps.maxMessageBytes, 1 << 20);
  });

  it("health asks the token", async () => {
    const health = await client.health();
    assert.equal(health.ok, true);
    assert.equal(health.error, null);
    assert.equal(health.token.label, "node-test");
    assert.equal(typeof health.latencyMs, "number");
  });

  it("generateKey, getPublicKey, listKeys, getJwks, sign, verify, signBatch, deleteKey", async () => {
    const made = await client.generateKey("m-es384", { alg: "ES384" });
    assert.equal(made.alg, "ES384");
    assert.deepEqual(
      [made.jwk.kty, made.jwk.crv, made.jwk.kid, made.jwk.use],
      ["EC", "P-384", "m-es384", "sig"],
    );
    const rsa = await client.generateKey("m-ps256", { alg: "PS256", rsaBits: 2048 });
    assert.equal(rsa.jwk.kty, "RSA");

    const pub = await client.getPublicKey("m-es384");
    assert.deepEqual(pub.jwk, made.jwk);
    const spkiKey = createPublicKey({ key: Buffer.from(pub.spki), format: "der", type: "spki" });
    assert.equal(spkiKey.asymmetricKeyDetails.namedCurve, "secp384r1");

    const kids = (await client.listKeys()).map((k) => k.kid);
    assert.deepEqual(
      kids.filter((k) => k.startsWith("m-")),
      ["m-es384", "m-ps256"],
    );
    const jwks = await client.getJwks();
    assert.ok(jwks.keys.some((k) => k.kid === "m-ps256" && k.kty === "RSA"));

    const data = new TextEncoder().encode("hello");
    const sig = await client.sign("m-es384", data);
    assert.equal(sig.alg, "ES384");
    assert.equal(sig.signature.length, 96);
    const nodeKey = createPublicKey({ key: made.jwk, format: "jwk" });
    assert.ok(
      cryptoVerify("sha384", data, { key: nodeKey, dsaEncoding: "ieee-p1363" }, sig.signature),
    );
    assert.equal(await client.verify("m-es384", data, sig.signature), true);
    assert.equal(await client.verify("m-es384", "hellO", sig.signature), false);

    const der = await client.sign("m-es384", "hello", { format: "der" });
    assert.ok(cryptoVerify("sha384", data, nodeKey, der.signature));
    const digest = createHash("sha384").update(data).digest();
    const byDigest = await client.sign("m-es384", { digest });
    assert.equal(await client.verify("m-es384", { digest }, byDigest.signature), true);

    const batch = await client.signBatch([
      { kid: "m-es384", data: "one" },
      { kid: "m-none", data: "two" },
      { kid: "m-ps256", digest: createHash("sha256").update("three").digest() },
    ]);
    assert.equal(batch.length, 3);
    assert.ok(
      cryptoVerify(
        "sha384",
        Buffer.from("one"),
        { key: nodeKey, dsaEncoding: "ieee-p1363" },
        batch[0].signature,
      ),
    );
    assert.ok(batch[1].error instanceof HsmError);
    assert.equal(batch[1].error.code, "not_found");
    assert.equal(batch[2].signature.length, 256);

    assert.equal(await client.deleteKey("m-es384"), true);
    assert.equal(await client.deleteKey("m-es384"), false);
    await rejectsWith(client.getPublicKey("m-es384"), "not_found");
  });

  it("answers the agent's error codes as HsmError", async () => {
    await client.generateKey("e-es256");
    await rejectsWith(client.generateKey("e-es256"), "already_exists");
    await rejectsWith(client.sign("e-missing", "x"), "not_found");
    await rejectsWith(client.sign("e-es256", "x", { alg: "ES384" }), "unsupported_alg"); // the key cannot
    await rejectsWith(client.sign("e-es256", { digest: new Uint8Array(48) }), "invalid_params"); // agent: wrong length for its key
    await rejectsWith(client.verify("e-missing", "x", new Uint8Array(64)), "not_found");
  });

  it("refuses bad parameters before sending anything", async () => {
    const proxy = await RecordingProxy.start(join(agent.token.dir, "check.sock"), agent.socket);
    const checked = new HsmClient({ socketPath: proxy.path, maxRequestBytes: 4096 });
    try {
      const cases = [
        [() => checked.sign("", "x"), "invalid_params"],
        [() => checked.sign("x".repeat(256), "x"), "invalid_params"],
        [() => checked.sign("é".repeat(128), "x"), "invalid_params"], // 256 bytes of UTF-8
        [() => checked.sign("a\0b", "x"), "invalid_params"],
        [() => checked.sign("a\uD800", "x"), "invalid_params"],
        [() => checked.sign(42, "x"), "invalid_params"],
        [() => checked.sign("k", 42), "invalid_params"],
        [() => checked.sign("k", { digest: new Uint8Array(31) }), "invalid_params"],
        [
          () => checked.sign("k", { digest: new Uint8Array(32) }, { alg: "ES384" }),
          "invalid_params",
        ],
        [
          () => checked.sign("k", { digest: new Uint8Array(32) }, { alg: "EdDSA" }),
          "invalid_params",
        ],
        [() => checked.sign("k", "x", { alg: "HS256" }), "unsupported_alg"],
        [() => checked.sign("k", "x", { alg: "none" }), "unsupported_alg"],
        [() => checked.sign("k", "x", { format: "pem" }), "invalid_params"],
        [() => checked.sign("k", "x", { alg: "RS256", format: "der" }), "invalid_params"],
        [() => checked.sign("k", "x", { timeoutMs: 0 }), "invalid_params"],
        [() => checked.sign("k", "x", { timeoutMs: 1.5 }), "invalid_params"],
        [() => checked.sign("k", new Uint8Array(5000)), "invalid_params"], // over maxRequestBytes
        [() => checked.verify("k", "x", "not bytes"), "invalid_params"],
        [() => checked.generateKey("k", { alg: "ES256", rsaBits: 2048 }), "invalid_params"],
        [() => checked.generateKey("k", { alg: "RS256", rsaBits: 1024 }), "invalid_params"],
        [() => checked.generateKey("k", { alg: "ES999" }), "unsupported_alg"],
        [() => checked.signBatch([]), "invalid_params"],
        [
          () => checked.signBatch(Array.from({ length: 257 }, () => ({ kid: "k", data: "x" }))),
          "invalid_params",
        ],
        [() => checked.signBatch([{ kid: "k" }]), "invalid_params"],
        [
          () => checked.signBatch([{ kid: "k", data: "x", digest: new Uint8Array(32) }]),
          "invalid_params",
        ],
        [() => checked.signBatch([{ kid: "", data: "x" }]), "invalid_params"],
        [() => checked.getPublicKey(""), "invalid_params"],
        [() => checked.deleteKey("x".repeat(300)), "invalid_params"],
        [() => checked.signJwt("k", null), "jose_malformed"],
      ];
      for (const [call, code] of cases) await rejectsWith(call(), code);
      assert.equal(
        proxy.requests.length,
        0,
        `sent: ${JSON.stringify(proxy.requests.map(([m]) => m))}`,
      );
      // and a good call on the same client goes through
      await checked.health();
      assert.equal(proxy.count("health"), 1);
    } finally {
      checked.close();
      await proxy.close();
    }
  });

  it("JOSE: signJws/signJwt refuse a header alg or kid that is not the key's", async () => {
    await client.generateKey("j-ed", { alg: "EdDSA" });
    await rejectsWith(client.signJwt("j-ed", { sub: "a" }, { alg: "ES256" }), "jose_alg_mismatch");
    await rejectsWith(client.signJwt("j-ed", { sub: "a" }, { kid: "other" }), "jose_kid_mismatch");
    const jws = await client.signJws("j-ed", "payload", { cty: "text" });
    const [h, p] = jws.split(".");
    assert.deepEqual(JSON.parse(Buffer.from(h, "base64url")), {
      alg: "EdDSA",
      kid: "j-ed",
      cty: "text",
    });
    assert.equal(Buffer.from(p, "base64url").toString(), "payload");
  });
});

describe("error codes that need a particular agent", () => {
  let token;
  before(() => {
    token = new SoftHsmToken();
  });
  after(() => token.remove());

  async function withAgent(extraArgs, body) {
    const agent = await Agent.start(token, {
      socket: join(token.dir, `a${Date.now()}.sock`),
      extraArgs,
    });
    const client = new HsmClient({ socketPath: agent.socket, timeoutMs: 2000 });
    try {
      await body(client, agent);
    } finally {
      client.close();
      await agent.stop();
    }
  }

  it("permission_denied from a read-only agent", () =>
    withAgent(["--read-only"], async (client) => {
      assert.equal((await client.capabilities()).canCreate, false);
      await rejectsWith(client.generateKey("ro"), "permission_denied");
      await rejectsWith(client.deleteKey("ro"), "permission_denied");
    }));

  it("overloaded from a rate limit, retried within the deadline for idempotent calls", () =>
    withAgent(["--rate-limit", "0.5", "--rate-burst", "1"], async (client) => {
      await client.health({ maxAttempts: 1 });
      await rejectsWith(client.health({ maxAttempts: 1 }), "overloaded");
      // with retries, the bucket's next token (2 s) comes within the deadline
      assert.equal((await client.health({ timeoutMs: 6000 })).ok, true);
    }));

  it("audit_unavailable when the audit log cannot be written", () =>
    withAgent(["--audit-log", "/dev/full"], async (client) => {
      // The agent writes audit lines behind the answers: it refuses once a write has failed.
      await client.generateKey("au");
      let last = "ok";
      for (let i = 0; i < 300 && last !== "audit_unavailable"; i++) {
        last = await client.sign("au", "x", { maxAttempts: 1 }).then(
          () => "ok",
          (e) => e.code,
        );
        if (last === "ok") await new Promise((r) => setTimeout(r, 10));
      }
      assert.equal(last, "audit_unavailable");
      await rejectsWith(client.generateKey("au2"), "audit_unavailable"); // not retried: not idempotent
      // An idempotent call is retried until its deadline: it ends with the agent's code, or
      // with "timeout" when a retry was still in flight at the deadline.
      const started = Date.now();
      const code = await client.sign("au", "x", { timeoutMs: 300 }).then(
        () => "ok",
        (e) => e.code,
      );
      assert.ok(["audit_unavailable", "timeout"].includes(code), code);
      assert.ok(Date.now() - started >= 150, "gave up long before its deadline");
    }));

  it("timeout when the agent does not answer, and the agent's deadline_exceeded", () =>
    withAgent([], async (client, agent) => {
      await client.generateKey("slow");
      await agent.pause();
      try {
        const started = Date.now();
        await rejectsWith(client.sign("slow", "x", { timeoutMs: 200 }), "timeout");
        assert.ok(Date.now() - started >= 190);
        assert.equal(client.pendingCalls, 0);
        assert.equal(client.inFlight, 0);
      } finally {
        agent.resume();
      }
      // The abandoned request is answered deadline_exceeded by the agent (timeout_ms was sent);
      // the client drops that late answer. A fresh call works.
      assert.equal((await client.sign("slow", "y")).signature.length, 64);
    }));

  it("hsm_error and hsm_unavailable carry the token's ckr; hsm_unavailable is retried", async (t) => {
    const module = faultModule();
    if (module === undefined) {
      t.skip("tests/fault_module not built (cmake --build build/test --target hsm_fault_pkcs11)");
      return;
    }
    const control = join(token.dir, "faults.conf");
    writeFileSync(control, "");
    const agent = await Agent.start(token, {
      socket: join(token.dir, "fault.sock"),
      module,
      env: { HSM_FAULT_CONTROL: control, HSM_FAULT_POLL_US: "0" },
    });
    const client = new HsmClient({ socketPath: agent.socket, timeoutMs: 5000 });
    try {
      await client.generateKey("faulty");
      writeFileSync(control, "C_Sign rv=CKR_FUNCTION_FAILED count=1\n");
      await assert.rejects(client.sign("faulty", "x"), (err) => {
        assert.deepEqual([err.code, err.ckr], ["hsm_error", "CKR_FUNCTION_FAILED"]);
        return true;
      });
      writeFileSync(control, "C_Sign rv=CKR_DEVICE_ERROR count=1\n");
      await assert.rejects(client.sign("faulty", "x", { maxAttempts: 1 }), (err) => {
        assert.deepEqual([err.code, err.ckr], ["hsm_unavailable", "CKR_DEVICE_ERROR"]);
        return true;
      });
      // The same fault with retries: the agent recovers its session and the call succeeds.
      writeFileSync(control, "C_Sign rv=CKR_DEVICE_ERROR count=1\n");
      assert.equal((await client.sign("faulty", "x")).signature.length, 64);
    } finally {
      client.close();
      await agent.stop();
    }
  });

  it("connection_failed when no agent listens", async () => {
    const client = new HsmClient({ socketPath: join(token.dir, "nobody.sock"), timeoutMs: 300 });
    await rejectsWith(client.health(), "connection_failed");
    await rejectsWith(client.generateKey("nobody"), "connection_failed");
    client.close();
    await rejectsWith(client.health(), "connection_failed");
  });
});

describe("answers that break the protocol", () => {
  // A stand-in agent for what a real one never sends.
  async function fakeAgent(path, answer) {
    const server = createServer((socket) => {
      socket.on("data", () => socket.write(answer()));
      socket.on("error", () => {});
    });
    await new Promise((resolve) => server.listen(path, resolve));
    return server;
  }
  let token;
  before(() => {
    token = new SoftHsmToken();
  });
  after(() => token.remove());

  for (const [name, bytes, code] of [
    ["bytes that are not MessagePack", () => Buffer.from([0xc1]), "protocol_error"],
    ["an ext value", () => Buffer.from([0xd4, 0x01, 0x00]), "protocol_error"],
    ["a request instead of a response", () => encode([0, 1, "health", [{}]]), "protocol_error"],
    [
      "an answer over maxResponseBytes",
      () => encode([1, 1, null, { pad: new Uint8Array(3000) }]),
      "protocol_error",
    ],
    [
      "an error code the client does not know",
      () => encode([1, 1, { code: "new_code", message: "m" }, null]),
      "internal",
    ],
  ]) {
    it(`${name}: ${code}`, async () => {
      const path = join(token.dir, "fake.sock");
      const server = await fakeAgent(path, bytes);
      const client = new HsmClient({ socketPath: path, maxResponseBytes: 2048, timeoutMs: 1000 });
      try {
        await rejectsWith(client.health(), code);
        assert.equal(client.pendingCalls, 0);
      } finally {
        client.close();
        await new Promise((resolve) => server.close(resolve));
      }
    });
  }

  it("every protocol error code becomes an HsmError with its code and ckr; only transient ones are retried", async () => {
    const path = join(token.dir, "codes.sock");
    let code = "";
    let requests = 0;
    const server = createServer((socket) => {
      const decoder = new Decoder();
      socket.on("data", (chunk) => {
        for (const [, msgid] of decoder.decodeMulti(chunk)) {
          requests += 1;
          socket.write(
            encode([1, msgid, { code, message: `said ${code}`, ckr: "CKR_DEVICE_ERROR" }, null]),
          );
        }
      });
    });
    await new Promise((resolve) => server.listen(path, resolve));
    const client = new HsmClient({
      socketPath: path,
      maxAttempts: 3,
      initialBackoffMs: 1,
      maxBackoffMs: 2,
    });
    const transient = ["hsm_unavailable", "overloaded", "shutting_down", "audit_unavailable"];
    try {
      for (code of [
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
      ]) {
        for (const [method, idempotent] of [
          [() => client.sign("k", "x"), true],
          [() => client.deleteKey("k"), false],
        ]) {
          requests = 0;
          await assert.rejects(method(), (err) => {
            assert.ok(err instanceof HsmError);
            assert.deepEqual(
              [err.code, err.message, err.ckr],
              [code, `said ${code}`, "CKR_DEVICE_ERROR"],
            );
            return true;
          });
          assert.equal(requests, idempotent && transient.includes(code) ? 3 : 1, `${code}`);
        }
      }
    } finally {
      client.close();
      await new Promise((resolve) => server.close(resolve));
    }
  });

  it("a response split across reads is put together", async () => {
    const path = join(token.dir, "split.sock");
    const server = createServer((socket) => {
      socket.on("data", async (request) => {
        const msgid = request[2]; // 0x94 0x00 <fixint msgid>: the first request
        const bytes = encode([
          1,
          msgid,
          null,
          { ok: true, latency_ms: 1.5, error: null, token: {} },
        ]);
        for (const b of bytes) {
          socket.write(Buffer.from([b]));
          await new Promise((r) => setImmediate(r));
        }
      });
    });
    await new Promise((resolve) => server.listen(path, resolve));
    const client = new HsmClient({ socketPath: path });
    try {
      assert.equal((await client.health()).latencyMs, 1.5);
    } finally {
      client.close();
      await new Promise((resolve) => server.close(resolve));
    }
  });
});
