#!/usr/bin/env bash
# The Node.js client's tests (client/node): installs its locked dependencies with `npm ci`,
# builds it with tsc --strict, and runs node's test runner against a real hsm-agent on
# SoftHSMv2 tokens (each test file makes its own), including the `npm pack` tarball installed
# into a scratch project that signs a JWT.
#
#   scripts/test-node.sh [path/to/hsm-agent]      default: $HSM_AGENT_BINARY, else build/test/agent/hsm-agent
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

agent=${1:-${HSM_AGENT_BINARY:-$root/build/test/agent/hsm-agent}}
if [[ ! -x "$agent" ]]; then
  echo "test-node: no hsm-agent at $agent (build the hsm-agent target, or pass its path)" >&2
  exit 2
fi
export HSM_AGENT_BINARY=$agent

cd client/node
npm ci --no-audit --no-fund --loglevel=error
npm run --silent build
# One file at a time (each starts its own agents; CI has two cores), and a way that works on
# Node 18, whose runner has no --test-concurrency.
failed=()
for file in test/*.test.mjs; do
  node --test "$file" || failed+=("$file")
done
if ((${#failed[@]} > 0)); then
  echo "test-node: failed: ${failed[*]}" >&2
  exit 1
fi
