#!/usr/bin/env node
// The Node.js client (client/node) against the C++ client (`hsmctl bench`) on the same agent,
// in one run: signatures per second at 1 and 64 in flight on one connection. Issue 18's target:
// the Node client at >= 0.7x the C++ client at 64 in flight (information, not a gate).
//
//   node bench/node_client_bench.mjs --agent BIN --hsmctl BIN [--duration S] [--repeat N]
//   node bench/node_client_bench.mjs --load --socket PATH --kid KID --depth D --duration S --warmup S
//
// The first form makes a throwaway SoftHSMv2 token and ES256 key, starts the agent, and runs the
// two clients one after the other at each concurrency, `--repeat` rounds interleaved, keeping
// each one's best round (other load on the machine only ever makes a round slower). The second
// form is the Node side of one measurement (a child process, so its CPU time is its own); it
// prints one JSON line in the shape of `hsmctl bench --json`.
import { execFileSync, spawnSync } from "node:child_process";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { loadavg } from "node:os";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "..");
const clientDist = join(repo, "client/node/dist/index.js");

const { values: args } = parseArgs({
  options: {
    load: { type: "boolean", default: false },
    agent: { type: "string" },
    hsmctl: { type: "string" },
    socket: { type: "string" },
    kid: { type: "string", default: "bench-es256" },
    depth: { type: "string", default: "1" },
    duration: { type: "string", default: "3" },
    warmup: { type: "string", default: "0.5" },
    repeat: { type: "string", default: "1" },
    concurrency: { type: "string", default: "1,64" },
  },
});

function percentile(sorted, p) {
  return sorted.length === 0
    ? null
    : sorted[
        Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))
      ];
}

/** One measurement: `depth` calls always in flight on one HsmClient. */
async function load() {
  const { HsmClient } = await import(clientDist);
  const depth = Number(args.depth);
  const warmupMs = Number(args.warmup) * 1000;
  const durationMs = Number(args.duration) * 1000;
  const client = new HsmClient({ socketPath: args.socket, maxAttempts: 1 }); // errors are errors
  const payload = new Uint8Array(32).fill(7);
  await client.sign(args.kid, payload); // connect and check the path before the clock starts
  const start = performance.now() + warmupMs;
  const end = start + durationMs;
  const latencies = [];
  let errors = 0;
  let firstError = "";
  let cpuStart;
  const cpuTimer = setTimeout(() => (cpuStart = process.cpuUsage()), warmupMs);
  const worker = async () => {
    for (;;) {
      const t0 = performance.now();
      if (t0 >= end) return;
      try {
        await client.sign(args.kid, payload);
        const t1 = performance.now();
        if (t0 >= start && t1 <= end) latencies.push((t1 - t0) * 1000);
      } catch (err) {
        errors += 1;
        firstError ||= `${err.code}: ${err.message}`;
      }
    }
  };
  await Promise.all(Array.from({ length: depth }, worker));
  clearTimeout(cpuTimer);
  const cpu = process.cpuUsage(cpuStart);
  client.close();
  latencies.sort((a, b) => a - b);
  const ops = latencies.length;
  const round = (x) => (x === null ? null : Math.round(x * 10) / 10);
  console.log(
    JSON.stringify({
      mode: "node",
      depth,
      concurrency: depth,
      duration_s: durationMs / 1000,
      ops,
      errors,
      first_error: firstError,
      throughput_per_s: ops / (durationMs / 1000),
      latency_us: {
        p50: round(percentile(latencies, 50)),
        p99: round(percentile(latencies, 99)),
      },
      cpu_us_per_op: {
        client: ops ? round((cpu.user + cpu.system) / ops) : null,
      },
    }),
  );
}

async function compare() {
  const { startAgent } = await import(join(repo, "client/node/test/agent.mjs"));
  if (!args.agent || !args.hsmctl)
    throw new Error("--agent BIN and --hsmctl BIN are required");
  process.env.HSM_AGENT_BINARY = args.agent;
  const agent = await startAgent({ extraArgs: ["--audit-log", "/dev/null"] });
  const loadBefore = loadavg()[0];
  try {
    execFileSync(
      args.hsmctl,
      ["--socket", agent.socket, "gen", args.kid, "--alg", "ES256"],
      { stdio: "ignore" },
    );
    const levels = args.concurrency.split(",").map(Number);
    const best = {};
    const common = ["--duration", args.duration, "--warmup", args.warmup];
    for (let round = 0; round < Number(args.repeat); round++) {
      for (const depth of levels) {
        const runs = {
          cpp: [
            args.hsmctl,
            [
              "--socket",
              agent.socket,
              "--json",
              "bench",
              args.kid,
              "--depth",
              String(depth),
              "--data-bytes",
              "32",
              ...common,
            ],
          ],
          node: [
            process.execPath,
            [
              fileURLToPath(import.meta.url),
              "--load",
              "--socket",
              agent.socket,
              "--kid",
              args.kid,
              "--depth",
              String(depth),
              ...common,
            ],
          ],
        };
        for (const [mode, [bin, argv]] of Object.entries(runs)) {
          const run = spawnSync(bin, argv, { encoding: "utf8" });
          if (run.status !== 0)
            throw new Error(
              `${mode} at ${depth}: exit ${run.status}: ${run.stderr}`,
            );
          const result = JSON.parse(run.stdout.trim().split("\n").pop());
          if (result.errors > 0)
            throw new Error(
              `${mode} at ${depth}: ${result.errors} errors ${result.first_error ?? ""}`,
            );
          const key = `${mode}@${depth}`;
          if (
            !best[key] ||
            result.throughput_per_s > best[key].throughput_per_s
          )
            best[key] = result;
        }
      }
    }
    const f = (x, w = 9) =>
      String(
        x === null || x === undefined
          ? "-"
          : typeof x === "number"
            ? Math.round(x * 10) / 10
            : x,
      ).padStart(w);
    console.log(
      `in flight |    C++/s   p50 us   p99 us  cpu us |   Node/s   p50 us   p99 us  cpu us | node/C++`,
    );
    const ratios = {};
    for (const depth of levels) {
      const c = best[`cpp@${depth}`];
      const n = best[`node@${depth}`];
      ratios[depth] = n.throughput_per_s / c.throughput_per_s;
      console.log(
        `${f(depth)} |${f(c.throughput_per_s)}${f(c.latency_us.p50)}${f(c.latency_us.p99)}${f(c.cpu_us_per_op?.client, 8)} |` +
          `${f(n.throughput_per_s)}${f(n.latency_us.p50)}${f(n.latency_us.p99)}${f(n.cpu_us_per_op?.client, 8)} |${f(ratios[depth].toFixed(2))}`,
      );
    }
    console.log(
      `one connection each; ES256, 32-byte messages; ${args.duration} s after ${args.warmup} s warm-up; best of ${args.repeat}`,
    );
    console.log(
      `cpu us: the client process's CPU time per signature; load average ${loadBefore.toFixed(1)} before, ${loadavg()[0].toFixed(1)} after`,
    );
    if (ratios[64] !== undefined) {
      console.log(
        `issue 18 target\n  ${ratios[64] >= 0.7 ? "PASS" : "MISS"}  64 in flight: Node/C++ throughput >= 0.70: ${ratios[64].toFixed(3)}`,
      );
    }
  } finally {
    await agent.close();
  }
}

await (args.load ? load() : compare());
