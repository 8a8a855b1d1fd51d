// Cancellation: an AbortSignal or a timeout ends a call at once, leaves no pending entry behind,
// and no timer or socket that keeps the process alive.
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { HsmClient, HsmError } from "../dist/index.js";
import { startAgent } from "./agent.mjs";

const dist = fileURLToPath(new URL("../dist/index.js", import.meta.url));

describe("cancellation", () => {
  let agent;
  before(async () => {
    agent = await startAgent();
    const client = new HsmClient({ socketPath: agent.socket });
    await client.generateKey("cancel-key");
    client.close();
  });
  after(async () => {
    agent.resume();
    await agent.close();
  });

  it("an AbortSignal ends calls in flight, waiting to connect, and already aborted", async () => {
    const client = new HsmClient({ socketPath: agent.socket });
    try {
      await client.health(); // connected
      await agent.pause();
      const controller = new AbortController();
      const calls = Array.from({ length: 50 }, (_, i) =>
        client.sign("cancel-key", `m${i}`, { signal: controller.signal }),
      );
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(client.inFlight, 50);
      controller.abort(new Error("user left"));
      for (const call of calls) {
        await assert.rejects(
          call,
          (err) =>
            err instanceof HsmError && err.code === "aborted" && err.cause.message === "user left",
        );
      }
      assert.equal(client.pendingCalls, 0);
      assert.equal(client.inFlight, 0);
      await assert.rejects(
        client.health({ signal: AbortSignal.abort() }),
        (err) => err.code === "aborted",
      );
      assert.equal(client.pendingCalls, 0);
    } finally {
      agent.resume();
      client.close();
    }
  });

  it("close() fails pending calls with connection_failed", async () => {
    const client = new HsmClient({ socketPath: agent.socket });
    try {
      await agent.pause();
      const calls = Array.from({ length: 10 }, () => client.getJwks());
      await new Promise((r) => setTimeout(r, 50));
      client.close();
      for (const call of calls)
        await assert.rejects(call, (err) => err.code === "connection_failed");
      assert.equal(client.pendingCalls, 0);
    } finally {
      agent.resume();
    }
  });

  it("a process whose calls timed out or were aborted exits on its own, without close()", async () => {
    await agent.pause();
    try {
      const script = `
        import { HsmClient } from ${JSON.stringify(dist)};
        const client = new HsmClient({ socketPath: ${JSON.stringify(agent.socket)} });
        const controller = new AbortController();
        const aborted = client.sign("cancel-key", "a", { signal: controller.signal, timeoutMs: 60000 });
        const timedOut = Array.from({ length: 20 }, () => client.sign("cancel-key", "t", { timeoutMs: 200 }));
        setTimeout(() => controller.abort(), 50);
        const codes = await Promise.all([aborted, ...timedOut].map((p) => p.then(() => "ok", (e) => e.code)));
        const timers = process.getActiveResourcesInfo().filter((r) => r === "Timeout");
        console.log(JSON.stringify({ codes: [...new Set(codes)].sort(), pending: client.pendingCalls, inFlight: client.inFlight, timers: timers.length }));
      `;
      const child = spawn(process.execPath, ["--input-type=module", "-e", script], {
        stdio: ["ignore", "pipe", "inherit"],
      });
      let out = "";
      child.stdout.on("data", (d) => (out += d));
      // A hang would leave the test to the runner's timeout; a guard kills it and says so.
      const guard = setTimeout(() => child.kill("SIGKILL"), 20_000);
      const [code, signal] = await new Promise((resolve) =>
        child.once("exit", (c, s) => resolve([c, s])),
      );
      clearTimeout(guard);
      assert.equal(signal, null, "the process did not exit on its own");
      assert.equal(code, 0);
      assert.deepEqual(JSON.parse(out), {
        codes: ["aborted", "timeout"],
        pending: 0,
        inFlight: 0,
        timers: 0,
      });
    } finally {
      agent.resume();
    }
  });
});
