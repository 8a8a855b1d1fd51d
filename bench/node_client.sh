#!/usr/bin/env bash
# Node.js client vs C++ client on the same agent (issue 18): builds hsm-agent and hsmctl, and
# the Node package (npm ci + tsc), then runs bench/node_client_bench.mjs.
#
#   bench/node_client.sh [--build-dir DIR] [--duration S] [--repeat N] [--concurrency 1,64]
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=build/bench
args=()
while (($# > 0)); do
  case $1 in
    --build-dir) build_dir=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ ! -f "$build_dir/CMakeCache.txt" ]]; then
  cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DHSM_BUILD_BENCH=ON >/dev/null
fi
cmake --build "$build_dir" -j"${HSM_JOBS:-2}" --target hsm-agent hsmctl >/dev/null
(cd client/node && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build)
exec node bench/node_client_bench.mjs --agent "$build_dir/agent/hsm-agent" \
  --hsmctl "$build_dir/client/hsmctl" "${args[@]}"
