#!/usr/bin/env bash
# The whole test suite, from a fresh Debian bookworm machine: installs packages, builds, runs
# every test with ctest (unit, integration against a real SoftHSMv2 token, fault injection,
# promtool), then the deploy checks (Prometheus rules, dashboard, systemd, Helm chart).
#
#   scripts/test.sh                          what CI runs
#   HSM_TEST_QUICK=1 scripts/test.sh         only the main build's ctest run
#   HSM_TEST_SANITIZERS=1 HSM_TEST_FUZZ=1 scripts/test.sh
#                                            also ASan+UBSan, TSan and a bounded libFuzzer run
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

scripts/install-deps.sh

jobs=${HSM_JOBS:-2}
section() { printf '\n==== %s ====\n' "$*"; }

section "build (RelWithDebInfo)"
cmake -S . -B build/test -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHSM_BUILD_BENCH=OFF >/dev/null
cmake --build build/test -j"$jobs"

section "ctest"
ctest --test-dir build/test --output-on-failure -j"$jobs" --timeout 600

if [[ "${HSM_TEST_QUICK:-0}" == "1" ]]; then exit 0; fi

if [[ -x scripts/test-extra.sh ]]; then
  section "sanitizers, fuzzing, deploy checks"
  scripts/test-extra.sh
fi
