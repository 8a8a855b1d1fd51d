// Test tool: a Unix-socket proxy between a client and the agent that records the requests it
// forwards (decoded, by method) and can cut a connection right after forwarding a request, as
// an agent that dies with that request in flight would.
import { createServer, connect } from "node:net";
import { rmSync } from "node:fs";
import { Decoder } from "@msgpack/msgpack";

export class RecordingProxy {
  /** `cutAfter(method)`: true to cut the client's connection once that request is forwarded. */
  static async start(path, agentSocket, { cutAfter = () => false } = {}) {
    const proxy = new RecordingProxy(path, agentSocket, cutAfter);
    rmSync(path, { force: true });
    await new Promise((resolve, reject) => {
      proxy.server.once("error", reject);
      proxy.server.listen(path, resolve);
    });
    return proxy;
  }

  constructor(path, agentSocket, cutAfter) {
    this.path = path;
    this.requests = []; // [method, params]
    this.connections = 0;
    this.sockets = new Set();
    this.server = createServer((client) => {
      this.connections += 1;
      const upstream = connect({ path: agentSocket });
      this.sockets.add(client);
      this.sockets.add(upstream);
      const decoder = new Decoder();
      let pending = Buffer.alloc(0);
      let cutting = false; // answers are no longer passed on
      client.on("data", async (chunk) => {
        // Whole messages only: decode what has arrived, forward exactly those bytes.
        pending = Buffer.concat([pending, chunk]);
        let used = 0;
        try {
          for (const message of decoder.decodeMulti(pending)) {
            void message;
          }
          used = pending.length;
        } catch {
          return; // incomplete: wait for more (tests send small requests)
        }
        const bytes = pending.subarray(0, used);
        pending = Buffer.alloc(0);
        let cut = false;
        for (const message of decoder.decodeMulti(bytes)) {
          this.requests.push([message[2], message[3][0]]);
          if (cutAfter(message[2])) cut = true;
        }
        upstream.write(bytes);
        if (cut) {
          cutting = true;
          // Let the request reach the agent, then lose the connection before any answer.
          setTimeout(() => {
            client.destroy();
            upstream.destroy();
          }, 20);
        }
      });
      upstream.on("data", (d) => {
        if (!cutting) client.write(d);
      });
      const end = () => {
        client.destroy();
        upstream.destroy();
        this.sockets.delete(client);
        this.sockets.delete(upstream);
      };
      client.on("close", end);
      upstream.on("close", end);
      client.on("error", () => {});
      upstream.on("error", () => {});
    });
  }

  count(method) {
    return this.requests.filter(([m]) => m === method).length;
  }

  async close() {
    for (const s of this.sockets) s.destroy();
    await new Promise((resolve) => this.server.close(resolve));
  }
}
