// Test fixture: a SoftHSMv2 token in a temporary directory and a real hsm-agent serving it on a
// Unix socket (the Node twin of tests/fixtures/softhsm_token.cpp and agent_process.cpp).
// The PIN reaches the agent through a 0600 PIN file, never its argv; softhsm2-util takes the
// throwaway test PINs as arguments (it has no other non-interactive way).
import { spawn, spawnSync } from "node:child_process";
import {
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
  existsSync,
  mkdirSync,
} from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { randomBytes } from "node:crypto";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../../..");

export const MODULE = process.env.HSM_PKCS11_MODULE ?? "/usr/lib/softhsm/libsofthsm2.so";

/** tests/fault_module's forwarding module, or undefined when it was not built. */
export function faultModule() {
  const path =
    process.env.HSM_FAULT_MODULE ??
    join(repo, "build/test/tests/fault_module/libhsm_fault_pkcs11.so");
  return existsSync(path) ? path : undefined;
}

/** The agent binary: $HSM_AGENT_BINARY, else the test build of this checkout. */
export function agentBinary() {
  const binary = process.env.HSM_AGENT_BINARY ?? join(repo, "build/test/agent/hsm-agent");
  if (!existsSync(binary))
    throw new Error(`no hsm-agent at ${binary}: build it or set HSM_AGENT_BINARY`);
  return binary;
}

export class SoftHsmToken {
  constructor(label = "node-test") {
    this.label = label;
    this.dir = mkdtempSync(join(process.env.TMPDIR ?? tmpdir(), "hsm-node-"));
    const tokens = join(this.dir, "tokens");
    mkdirSync(tokens);
    this.conf = join(this.dir, "softhsm2.conf");
    writeFileSync(
      this.conf,
      `directories.tokendir = ${tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n`,
    );
    this.pin = randomBytes(8).toString("hex");
    this.pinFile = join(this.dir, "pin");
    writeFileSync(this.pinFile, this.pin, { mode: 0o600 });
    const init = spawnSync(
      "softhsm2-util",
      ["--init-token", "--free", "--label", label, "--pin", this.pin, "--so-pin", this.pin],
      { env: { ...process.env, SOFTHSM2_CONF: this.conf }, encoding: "utf8" },
    );
    if (init.status !== 0) {
      this.remove();
      throw new Error(
        `softhsm2-util --init-token failed (exit ${init.status}): ${init.stderr}${init.stdout}`,
      );
    }
  }

  remove() {
    rmSync(this.dir, { recursive: true, force: true });
  }
}

function canConnect(path) {
  return new Promise((resolve) => {
    const socket = connect({ path });
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

export class Agent {
  /** Starts hsm-agent on `token`; `extraArgs` are further flags. */
  static async start(token, { socket, extraArgs = [], module = MODULE, env = {} } = {}) {
    const agent = new Agent(token, socket ?? join(token.dir, "agent.sock"), extraArgs);
    agent.module = module;
    agent.env = env;
    await agent.#launch();
    return agent;
  }

  constructor(token, socket, extraArgs) {
    this.token = token;
    this.socket = socket;
    this.extraArgs = extraArgs;
    this.generation = 0;
  }

  async #launch() {
    this.generation += 1;
    this.stderrPath = join(this.token.dir, `agent-${this.generation}.stderr`);
    this.auditPath = join(this.token.dir, `audit-${this.generation}.log`);
    const args = [
      "--module",
      this.module,
      "--token-label",
      this.token.label,
      "--socket",
      this.socket,
      "--pin-file",
      this.token.pinFile,
      "--metrics-listen",
      "",
      ...(this.extraArgs.includes("--audit-log") ? [] : ["--audit-log", this.auditPath]),
      ...this.extraArgs,
    ];
    this.stderr = "";
    this.process = spawn(agentBinary(), args, {
      env: { ...process.env, ...this.env, SOFTHSM2_CONF: this.token.conf },
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.process.stderr.on("data", (d) => {
      this.stderr = (this.stderr + d.toString()).slice(-8000);
    });
    this.exited = new Promise((resolve) =>
      this.process.once("exit", (code, signal) => resolve({ code, signal })),
    );
    let gone = false;
    void this.exited.then(() => (gone = true));
    const until = Date.now() + 20_000;
    while (Date.now() < until) {
      if (gone) throw new Error(`hsm-agent exited during start: ${this.stderr}`);
      if (await canConnect(this.socket)) return;
      await new Promise((r) => setTimeout(r, 20));
    }
    throw new Error(`hsm-agent did not listen within 20 s: ${this.stderr}`);
  }

  /** The audit log's lines of this generation of the agent (one JSON object each). */
  auditLines() {
    if (!existsSync(this.auditPath)) return [];
    return readFileSync(this.auditPath, "utf8").split("\n").filter(Boolean);
  }

  get running() {
    return this.process.exitCode === null && this.process.signalCode === null;
  }

  /** Stops the agent (SIGKILL by default: a crash; SIGTERM: a rollout). */
  async stop(signal = "SIGKILL") {
    if (!this.running) return;
    this.process.kill(signal);
    await this.exited;
  }

  /** Stops the agent with SIGSTOP and waits until every thread of it is stopped: it then reads
   * nothing, while its socket still accepts connections (the kernel's backlog). */
  async pause() {
    this.process.kill("SIGSTOP");
    const tasks = `/proc/${this.process.pid}/task`;
    const stopped = () =>
      readdirSync(tasks).every((t) => {
        try {
          return / [Tt] /.test(readFileSync(`${tasks}/${t}/stat`, "utf8").replace(/^.*\)/, ""));
        } catch {
          return true; // the thread is gone
        }
      });
    while (!stopped()) await new Promise((r) => setTimeout(r, 5));
  }

  resume() {
    this.process.kill("SIGCONT");
  }

  /** Starts a new agent process on the same token and socket. */
  async restart() {
    await this.stop();
    rmSync(this.socket, { force: true });
    await this.#launch();
  }
}

/** A token and an agent for one test file; `close()` stops and removes both. */
export async function startAgent(options) {
  const token = new SoftHsmToken();
  try {
    const agent = await Agent.start(token, options);
    agent.close = async () => {
      await agent.stop();
      token.remove();
    };
    return agent;
  } catch (err) {
    token.remove();
    throw err;
  }
}
