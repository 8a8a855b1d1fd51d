#!/usr/bin/env bash
# bench/smoke_test.sh: what CI's `bench_smoke` test runs (bench/CMakeLists.txt). The harness runs
# end to end (`run.sh --quick`, every run error-free) and produces its table and its JSON: every
# scenario and concurrency has a row with all three modes, each having signed something. No
# timing assertions: the numbers are the benchmark's output, not a test gate.
#
#   bench/smoke_test.sh JSON_OUT [run.sh options...]
set -euo pipefail
readonly here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
(($# >= 1)) || { echo "usage: bench/smoke_test.sh JSON_OUT [run.sh options...]" >&2; exit 2; }
json_out=$1
shift
table=$(mktemp)
trap 'rm -f "$table"' EXIT
rm -f "$json_out"
"$here/run.sh" --quick --json-out "$json_out" "$@" | tee "$table"
/usr/bin/python3 - "$table" "$json_out" <<'PY'
import json, sys
table_text = open(sys.argv[1]).read()
document = json.load(open(sys.argv[2]))
problems = []
for heading in ("scenario", "direct/s", "agent/s", "p11kit/s", "ag/dir", "ag/p11",
                "CPU time per signature", "issue 7 targets", "load average"):
    if heading not in table_text:
        problems.append(f"the table has no '{heading}'")
expected = {("softhsm", 1), ("softhsm+2ms", 1), ("softhsm+2ms", 16)}
rows = {(row["scenario"], row["concurrency"]): row for row in document["table"]}
if set(rows) != expected:
    problems.append(f"table rows {sorted(rows)}, expected {sorted(expected)}")
for key, row in rows.items():
    for mode in ("direct", "agent", "p11kit"):
        cell = row[mode]
        if cell["errors"] or not cell["throughput_per_s"] > 0 or cell["p50_us"] is None:
            problems.append(f"{key} {mode}: {cell}")
        if cell["cpu_us_per_op"] is None:
            problems.append(f"{key} {mode}: no CPU per signature")
    if row["agent_over_direct"] is None or row["agent_over_p11kit"] is None:
        problems.append(f"{key}: ratios missing")
    if f"{key[0]:<14} {key[1]:>4} |" not in table_text:
        problems.append(f"{key}: no line in the printed table")
for run in document["runs"]:
    if run.get("errors", 1) or not run.get("ops"):
        problems.append(f"run failed: {run}")
if not document["targets"]:
    problems.append("no issue-7 targets evaluated")
if problems:
    print("bench smoke test failed:\n  " + "\n  ".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"bench smoke test: {len(rows)} rows, {len(document['runs'])} runs, table and JSON ok")
PY
