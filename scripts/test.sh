#!/usr/bin/env bash
# The whole test suite, from a fresh Debian bookworm machine: installs packages, builds, runs
# every test with ctest (unit, integration against a real SoftHSMv2 token, fault injection,
# security as other uids, a real Prometheus scrape, the installed client package, the benchmark
# smoke test), then scripts/test-extra.sh (ASan+UBSan, TSan, libFuzzer, deployment checks).
#
#   scripts/test.sh                          what CI runs
#   HSM_TEST_QUICK=1 scripts/test.sh         only the main build's ctest run
#   HSM_TEST_SANITIZERS=0 HSM_TEST_FUZZ=0 scripts/test.sh
#                                            skip the sanitizer builds and the fuzzing run
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

scripts/install-deps.sh

jobs=${HSM_JOBS:-2}
section() { printf '\n==== %s ====\n' "$*"; }

section "build (RelWithDebInfo)"
cmake -S . -B build/test -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHSM_BUILD_BENCH=ON >/dev/null
cmake --build build/test -j"$jobs"

section "ctest"
ctest --test-dir build/test --output-on-failure -j"$jobs" --timeout 600

if [[ "${HSM_TEST_QUICK:-0}" == "1" ]]; then exit 0; fi

if [[ -x scripts/test-extra.sh ]]; then
  section "sanitizers, fuzzing, deploy checks"
  scripts/test-extra.sh
fi
