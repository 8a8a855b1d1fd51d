#!/usr/bin/env bash
# The whole test suite, from a fresh Debian bookworm machine: installs packages, builds, runs
# every test with ctest (unit, integration against a real SoftHSMv2 token, fault injection,
# security as other uids, a real Prometheus scrape, the installed client package, the benchmark
# smoke test), the Node.js client (scripts/test-node.sh), then scripts/test-extra.sh (ASan+UBSan,
# TSan, libFuzzer, deployment checks).
#
#   scripts/test.sh                          what CI runs
#   HSM_TEST_QUICK=1 scripts/test.sh         only the main build's ctest run
#   HSM_TEST_SANITIZERS=0 HSM_TEST_FUZZ=0 scripts/test.sh
#                                            skip the sanitizer builds and the fuzzing run
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
section() { printf '\n==== %s ====\n' "$*"; }
# shellcheck source=scripts/stage_timer.sh
source scripts/stage_timer.sh
trap 'stage_summary $?' EXIT

section "Debian packages"
scripts/install-deps.sh
stage_done install-deps

jobs=${HSM_JOBS:-2}
# Every build below (this one, the sanitizer and fuzzing builds of test-extra.sh) goes through
# ccache: a machine that built the same sources before, in any checkout, compiles only what
# changed. Paths are made relative to the checkout, so another clone hits the same cache.
if command -v ccache >/dev/null 2>&1; then
  export CMAKE_C_COMPILER_LAUNCHER=ccache CMAKE_CXX_COMPILER_LAUNCHER=ccache
  export CCACHE_BASEDIR=$root CCACHE_NOHASHDIR=1
fi

section "build (RelWithDebInfo)"
cmake -S . -B build/test -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHSM_BUILD_BENCH=ON >/dev/null
cmake --build build/test -j"$jobs"
stage_done build

section "ctest"
ctest --test-dir build/test --output-on-failure -j"$jobs" --timeout 600
stage_done ctest

if [[ "${HSM_TEST_QUICK:-0}" == "1" ]]; then exit 0; fi

section "Node.js client (client/node)"
scripts/test-node.sh "$root/build/test/agent/hsm-agent"
stage_done node-client

if [[ -x scripts/test-extra.sh ]]; then
  section "sanitizers, fuzzing, deploy checks"
  scripts/test-extra.sh
fi
