// Validates every Kubernetes object in the given YAML files against the Kubernetes schemas,
// with the model classes of the npm package kubernetes-models (and
// @kubernetes-models/prometheus-operator for monitoring.coreos.com objects).
//
//   node validate.mjs FILE.yaml...
//
// Each document's apiVersion/kind selects its class (apps/v1 Deployment ->
// kubernetes-models/apps/v1/Deployment); validate() checks it against the OpenAPI schema. An
// object of a kind no installed package knows fails, except monitoring.coreos.com objects when
// the prometheus-operator package is missing (skipped with a note).
//
// The OpenAPI schemas do not forbid unknown fields (the API server only warns about them), so a
// misspelt field such as readOnlyRootFileSystem would pass validate(). Every object is therefore
// also type-checked with TypeScript against the package's interface for its kind (I<Kind>):
// an object literal with a property its type does not declare is an error.
// Prints one line per object and "N passed, M failed"; exits 1 when any failed.
//
// Bare imports resolve from this file's location, so the script runs from the directory whose
// node_modules holds the packages: helm_test.sh copies it to tests/deploy/.tools/node/.
import { readFileSync, writeFileSync, rmSync } from "node:fs";
import { spawnSync } from "node:child_process";
import { createRequire } from "node:module";
import path from "node:path";
import { loadAll } from "js-yaml";

let havePromOperator = true;
try {
  await import("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor");
} catch {
  havePromOperator = false;
}

/** The module specifier of the model class for apiVersion/kind, or null. */
function modelSpec(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  if (group === "monitoring.coreos.com") {
    return `@kubernetes-models/prometheus-operator/monitoring.coreos.com/${version}/${kind}`;
  }
  return group === "" ? `kubernetes-models/${version}/${kind}` : `kubernetes-models/${group}/${version}/${kind}`;
}

let passed = 0;
let failed = 0;
let skipped = 0;
const typed = []; // objects to type-check for unknown fields
const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node validate.mjs FILE.yaml...");
  process.exit(2);
}

for (const file of files) {
  let docs;
  try {
    docs = loadAll(readFileSync(file, "utf8"));
  } catch (e) {
    console.log(`FAIL ${file}: not YAML: ${e.message}`);
    failed++;
    continue;
  }
  for (const doc of docs) {
    if (doc === null || doc === undefined) continue; // empty document between ---
    const where = `${path.basename(file)}: ${doc.kind ?? "?"} ${doc.metadata?.name ?? "?"}`;
    if (typeof doc.apiVersion !== "string" || typeof doc.kind !== "string") {
      console.log(`FAIL ${where}: no apiVersion/kind`);
      failed++;
      continue;
    }
    if (doc.apiVersion.startsWith("monitoring.coreos.com/") && !havePromOperator) {
      console.log(`skip ${where}: @kubernetes-models/prometheus-operator is not installed`);
      skipped++;
      continue;
    }
    let Model;
    try {
      const mod = await import(modelSpec(doc.apiVersion, doc.kind));
      Model = mod[doc.kind];
    } catch (e) {
      Model = undefined;
    }
    if (typeof Model !== "function") {
      console.log(`FAIL ${where}: no schema for ${doc.apiVersion} ${doc.kind}`);
      failed++;
      continue;
    }
    try {
      new Model(doc).validate();
      console.log(`ok   ${where}: schema (${doc.apiVersion})`);
      passed++;
    } catch (e) {
      console.log(`FAIL ${where}: schema: ${e.message}`);
      failed++;
    }
    typed.push({ where, spec: modelSpec(doc.apiVersion, doc.kind), kind: doc.kind, doc });
  }
}

// Unknown fields: one typed constant per object, one object per line of a generated file.
if (typed.length > 0) {
  const require = createRequire(import.meta.url);
  const tsc = require.resolve("typescript/bin/tsc");
  const file = path.join(path.dirname(new URL(import.meta.url).pathname), `strict-fields-${process.pid}.ts`);
  const header = typed.map((t, i) => `import type { I${t.kind} as T${i} } from "${t.spec}";`);
  const body = typed.map((t, i) => `export const o${i}: T${i} = ${JSON.stringify(t.doc)};`);
  writeFileSync(file, [...header, ...body].join("\n") + "\n");
  const r = spawnSync(process.execPath, [tsc, "--noEmit", "--strict", "--skipLibCheck", "--pretty", "false",
    "--module", "nodenext", "--moduleResolution", "nodenext", "--target", "es2022", file], { encoding: "utf8" });
  rmSync(file, { force: true });
  const errors = new Map(); // object index -> messages
  for (const line of (r.stdout + r.stderr).split("\n")) {
    const m = line.match(/\((\d+),\d+\): error (TS\d+: .*)$/);
    if (!m) continue;
    const index = Number(m[1]) - 1 - header.length;
    const key = index >= 0 && index < typed.length ? index : -1;
    errors.set(key, [...(errors.get(key) ?? []), m[2]]);
  }
  if (r.status !== 0 && errors.size === 0) errors.set(-1, [(r.stdout + r.stderr).trim() || "tsc failed"]);
  typed.forEach((t, i) => {
    if (errors.has(i)) {
      console.log(`FAIL ${t.where}: fields: ${errors.get(i).join("; ")}`);
      failed++;
    } else {
      console.log(`ok   ${t.where}: no unknown fields`);
      passed++;
    }
  });
  if (errors.has(-1)) {
    console.log(`FAIL type check: ${errors.get(-1).join("; ")}`);
    failed++;
  }
}

console.log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ""}`);
process.exit(failed === 0 ? 0 : 1);
