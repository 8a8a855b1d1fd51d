#!/usr/bin/env bash
# The checks beyond the main ctest run (called by scripts/test.sh):
#   1. the whole suite under AddressSanitizer + UndefinedBehaviorSanitizer,
#   2. the concurrency tests under ThreadSanitizer,
#   3. a bounded libFuzzer run over the request decoder,
#   4. deployment checks (Prometheus rules, Helm chart, image library list) when present.
# Each builds in its own build/<name> directory. The sanitizer and fuzzing stages are opt-in
# (HSM_TEST_SANITIZERS=1, HSM_TEST_FUZZ=1) until they have a verified CI time budget.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${HSM_JOBS:-2}
section() { printf '\n==== %s ====\n' "$*"; }

if [[ "${HSM_TEST_SANITIZERS:-0}" == "1" ]]; then
  section "AddressSanitizer + UndefinedBehaviorSanitizer: whole suite"
  cmake --preset asan-ubsan >/dev/null
  cmake --build --preset asan-ubsan
  # SoftHSMv2 is not instrumented; leaks inside it are not ours to fix.
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build/asan-ubsan --output-on-failure -j"$jobs" --timeout 900 \
      -LE "no-sanitizer"

  section "ThreadSanitizer: concurrency tests"
  cmake --preset tsan >/dev/null
  cmake --build --preset tsan
  TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
    ctest --test-dir build/tsan --output-on-failure -j"$jobs" --timeout 900 \
      -L "concurrency"
fi

if [[ "${HSM_TEST_FUZZ:-0}" == "1" ]]; then
  section "libFuzzer: request decoder (bounded run)"
  CC=clang CXX=clang++ cmake -S . -B build/fuzz -DHSM_BUILD_FUZZERS=ON -DHSM_BUILD_AGENT=OFF \
    -DHSM_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build build/fuzz -j"$jobs" --target request_fuzzer
  work=$(mktemp -d)
  cp tests/fuzz/corpus/* "$work/"
  build/fuzz/tests/fuzz/request_fuzzer -max_total_time="${HSM_FUZZ_SECONDS:-60}" \
    -max_len=65536 -print_final_stats=1 "$work"
  rm -rf "$work"
fi

for check in tests/deploy/run.sh; do
  if [[ -x "$check" ]]; then
    section "$check"
    "$check"
  fi
done
