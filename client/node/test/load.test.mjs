// Pipelining and recovery: many calls in flight on one connection, answered out of order and
// matched by msgid; an agent killed and restarted under load; generate_key never sent twice.
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { createPublicKey, verify as cryptoVerify } from "node:crypto";
import { join } from "node:path";
import { HsmClient, HsmError } from "../dist/index.js";
import { startAgent } from "./agent.mjs";
import { RecordingProxy } from "./proxy.mjs";

describe("load and recovery", () => {
  let agent;
  before(async () => {
    agent = await startAgent();
  });
  after(async () => {
    await agent.close();
  });

  it("1,000 concurrent signs on one connection are each answered by their own msgid", async () => {
    const proxy = await RecordingProxy.start(join(agent.token.dir, "pipe.sock"), agent.socket);
    const client = new HsmClient({ socketPath: proxy.path, timeoutMs: 30_000 });
    try {
      const key = await client.generateKey("pipe-ed", { alg: "EdDSA" });
      const publicKey = createPublicKey({ key: key.jwk, format: "jwk" });
      const messages = Array.from({ length: 1000 }, (_, i) => Buffer.from(`message ${i}`));
      const signatures = await Promise.all(messages.map((m) => client.sign("pipe-ed", m)));
      // Ed25519 is deterministic and bound to its message: a signature handed to the wrong
      // call (a mixed-up msgid) does not verify.
      signatures.forEach((s, i) =>
        assert.ok(cryptoVerify(null, messages[i], publicKey, s.signature), `call ${i}`),
      );
      assert.equal(proxy.connections, 1);
      assert.equal(proxy.count("sign"), 1000);
      assert.equal(client.inFlight, 0);
      assert.equal(client.pendingCalls, 0);
    } finally {
      client.close();
      await proxy.close();
    }
  });

  it("after an agent restart mid-load, idempotent calls succeed within their deadline", async () => {
    const client = new HsmClient({ socketPath: agent.socket, timeoutMs: 15_000 });
    try {
      await client.generateKey("restart-key");
      let answered = 0;
      const worker = async () => {
        for (let i = 0; i < 60; i++) {
          await client.sign("restart-key", `payload ${i}`);
          answered += 1;
        }
      };
      const load = Promise.all(Array.from({ length: 8 }, worker));
      while (answered < 40) await new Promise((r) => setTimeout(r, 2));
      await agent.restart(); // SIGKILL, then a new agent on the same socket and token
      const reads = Promise.all([
        client.getPublicKey("restart-key"),
        client.listKeys(),
        client.health(),
        client.getJwks(),
      ]);
      await load;
      await reads;
      assert.equal(answered, 480);
    } finally {
      client.close();
    }
  });

  it("generate_key in flight when the connection is lost fails with connection_failed and is not sent again", async () => {
    const proxy = await RecordingProxy.start(join(agent.token.dir, "cut.sock"), agent.socket, {
      cutAfter: (method) => method === "generate_key" || method === "delete_key",
    });
    const client = new HsmClient({ socketPath: proxy.path, timeoutMs: 5000 });
    try {
      await assert.rejects(
        client.generateKey("cut-key"),
        (err) => err instanceof HsmError && err.code === "connection_failed",
      );
      assert.equal(proxy.count("generate_key"), 1);
      // An idempotent call lost the same way is sent again, on a new connection.
      const cutSigns = await RecordingProxy.start(
        join(agent.token.dir, "cut2.sock"),
        agent.socket,
        {
          cutAfter: () => cutSigns.count("get_public_key") === 1,
        },
      );
      const reader = new HsmClient({ socketPath: cutSigns.path });
      try {
        await reader.getPublicKey("restart-key");
        assert.equal(cutSigns.count("get_public_key"), 2);
        assert.equal(cutSigns.connections, 2);
      } finally {
        reader.close();
        await cutSigns.close();
      }
      await assert.rejects(
        client.deleteKey("restart-key"),
        (err) => err instanceof HsmError && err.code === "connection_failed",
      );
      assert.equal(proxy.count("delete_key"), 1);
      assert.equal(proxy.count("generate_key"), 1);
    } finally {
      client.close();
      await proxy.close();
    }
  });

  it("generate_key is retried when it certainly never left (no agent yet), and sent once", async () => {
    const path = join(agent.token.dir, "late.sock");
    const client = new HsmClient({ socketPath: path, timeoutMs: 5000 });
    let proxy;
    try {
      const pending = client.generateKey("late-key");
      await new Promise((r) => setTimeout(r, 200)); // a few failed connects
      proxy = await RecordingProxy.start(path, agent.socket);
      const key = await pending;
      assert.equal(key.kid, "late-key");
      assert.equal(proxy.count("generate_key"), 1);
    } finally {
      client.close();
      await proxy?.close();
    }
  });
});
