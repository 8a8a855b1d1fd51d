// Packaging: the `npm pack` tarball installs into a fresh project, which type-checks against its
// declarations with tsc --strict and signs a JWT through a running agent. Run after the build
// (the pack skips its prepack tsc).
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { startAgent } from "./agent.mjs";

const packageDir = dirname(dirname(fileURLToPath(import.meta.url)));
const npm = process.platform === "win32" ? "npm.cmd" : "npm";
const own = JSON.parse(readFileSync(join(packageDir, "package.json"), "utf8"));

const consumer = `
import { HsmClient, HsmError, SidecarKmsAdapter, type KmsAdapter, type KmsKeyRef, type Alg } from "@hsm-sidecar/client";

// The app's registry holds KmsAdapters; the sidecar's is one.
const adapter: KmsAdapter = new SidecarKmsAdapter({ providerId: "hsm", socket: process.env.HSM_AGENT_SOCKET });
const client = new HsmClient({ timeoutMs: 2000 });
const alg: Alg = "ES256";
const { ref }: { ref: KmsKeyRef } = await adapter.generateKey({ kid: "scratch-ts", alg });
const signature: Uint8Array = await adapter.sign(ref, new TextEncoder().encode("x"));
const jwt: string = await client.signJwt("scratch-ts", { sub: "ts" });
try {
  await client.sign("missing", "x");
} catch (err) {
  if (!(err instanceof HsmError) || err.code !== "not_found") throw err;
}
console.log(JSON.stringify({ signature: signature.length, jwt: jwt.split(".").length }));
client.close();
(adapter as SidecarKmsAdapter).close();
`;

describe("npm pack", () => {
  let agent;
  let scratch;
  before(async () => {
    agent = await startAgent();
    scratch = join(agent.token.dir, "scratch");
    mkdirSync(scratch);
  });
  after(async () => {
    await agent.close();
  });

  it("installs into a scratch project that type-checks and signs a JWT through the agent", () => {
    const packed = JSON.parse(
      execFileSync(npm, ["pack", "--json", "--ignore-scripts", "--pack-destination", scratch], {
        cwd: packageDir,
        encoding: "utf8",
      }),
    );
    const files = packed[0].files.map((f) => f.path).sort();
    assert.ok(
      files.includes("dist/index.js") &&
        files.includes("dist/index.d.ts") &&
        files.includes("README.md"),
      files.join(),
    );
    assert.deepEqual(
      files.filter((f) => !f.startsWith("dist/") && f !== "README.md" && f !== "package.json"),
      [],
    );

    writeFileSync(
      join(scratch, "package.json"),
      JSON.stringify({ name: "scratch", private: true, type: "module" }),
    );
    execFileSync(
      npm,
      ["install", "--no-audit", "--no-fund", "--prefer-offline", join(scratch, packed[0].filename)],
      { cwd: scratch, stdio: ["ignore", "ignore", "inherit"] },
    );
    assert.equal(
      JSON.parse(
        readFileSync(join(scratch, "node_modules/@hsm-sidecar/client/package.json"), "utf8"),
      ).version,
      own.version,
    );

    const env = { ...process.env, HSM_AGENT_SOCKET: agent.socket };
    copyFileSync(join(packageDir, "examples/issue-jwt.mjs"), join(scratch, "issue-jwt.mjs"));
    const [jwt, claims] = execFileSync(
      process.execPath,
      ["issue-jwt.mjs", "scratch-issuer", "bob"],
      { cwd: scratch, env, encoding: "utf8" },
    )
      .trim()
      .split("\n");
    assert.equal(jwt.split(".").length, 3);
    assert.deepEqual(JSON.parse(claims).header, {
      alg: "ES256",
      kid: "scratch-issuer",
      typ: "JWT",
    });
    assert.equal(JSON.parse(claims).claims.sub, "bob");

    writeFileSync(join(scratch, "consumer.ts"), consumer);
    writeFileSync(
      join(scratch, "tsconfig.json"),
      JSON.stringify({
        compilerOptions: {
          strict: true,
          module: "NodeNext",
          moduleResolution: "NodeNext",
          target: "ES2022",
          outDir: "out",
          skipLibCheck: true,
          // The package's own TypeScript and Node types: installing them again would double
          // this test's time for nothing the consumer's check needs.
          typeRoots: [join(packageDir, "node_modules/@types")],
          types: ["node"],
        },
        files: ["consumer.ts"],
      }),
    );
    execFileSync(join(packageDir, "node_modules/.bin/tsc"), ["-p", "tsconfig.json"], {
      cwd: scratch,
      stdio: "inherit",
    });
    const out = JSON.parse(
      execFileSync(process.execPath, ["out/consumer.js"], { cwd: scratch, env, encoding: "utf8" }),
    );
    assert.deepEqual(out, { signature: 64, jwt: 3 });
  });
});
