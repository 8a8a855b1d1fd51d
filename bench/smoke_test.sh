#!/usr/bin/env bash
# bench/smoke_test.sh: what CI's `bench_smoke` test runs (bench/CMakeLists.txt). The harness runs
# end to end (`run.sh --quick`, every run error-free) and produces its tables and its JSON: every
# scenario and concurrency has a row with all three modes, each having signed something, and the
# plain SoftHSMv2 rows also have the process-boundary floor and the bare round trip; issue 7's and
# issue 16's targets are listed (issue 16's without a row in a quick run as "n/a"). No timing
# assertions: the numbers are the benchmark's output, not a test gate (PASS or MISS alike).
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
                "process-boundary floor", "floor/s", "fl/dir", "rtt p50", "ag/fl",
                "CPU time per signature", "floor: client + srv", "issue 7 targets",
                "issue 16 targets", "agent load", "load average"):
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
# The floor: on plain SoftHSMv2 only, both its modes measured, its own table line, and its
# bounds listed beside the issue-7 targets.
floors = {(row["scenario"], row["concurrency"]): row for row in document.get("floor_table", [])}
if set(floors) != {("softhsm", 1)}:
    problems.append(f"floor rows {sorted(floors)}, expected [('softhsm', 1)]")
floor_section = table_text.split("process-boundary floor", 1)[-1]
for key, row in floors.items():
    for mode in ("floor", "uds_rtt"):
        cell = row[mode]
        if cell["errors"] or not cell["throughput_per_s"] > 0 or cell["p50_us"] is None:
            problems.append(f"{key} {mode}: {cell}")
        if cell["cpu_us_per_op"] is None:
            problems.append(f"{key} {mode}: no CPU per operation")
    for ratio in ("floor_over_direct", "floor_added_p50_us", "uds_rtt_p50_us", "agent_over_floor"):
        if row[ratio] is None:
            problems.append(f"{key}: floor {ratio} missing")
    if f"{key[0]:<14} {key[1]:>4} |" not in floor_section:
        problems.append(f"{key}: no line in the printed floor table")
if "floor/direct (the floor" not in table_text or not document.get("floor_bounds"):
    problems.append("no floor bounds beside the issue-7 targets")
for run in document["runs"]:
    if run.get("errors", 1) or not run.get("ops"):
        problems.append(f"run failed: {run}")
if not document["targets"]:
    problems.append("no issue-7 targets evaluated")
# Issue 16's targets: all seven listed; those with a row in a --quick run (concurrency 1 on plain
# SoftHSMv2, 16 in flight on the 2 ms module) evaluated, the others "n/a", never MISS.
issue16 = {(t["scenario"], t["concurrency"], t["quantity"]): t
           for t in document.get("issue16_targets", [])}
if len(issue16) != 7:
    problems.append(f"{len(issue16)} issue-16 targets, expected 7")
for (scenario, level, quantity), t in issue16.items():
    expected_status = ("PASS", "MISS") if (scenario, level) in rows else ("n/a",)
    if t["status"] not in expected_status:
        problems.append(f"issue-16 target {t['target']}: {t['status']}")
    if f"{t['status']:<4}  {t['target']}:" not in table_text:
        problems.append(f"issue-16 target {t['target']}: no line in the printed targets")
# On plain SoftHSMv2 the agent has one connection per caller, one request in flight on each.
for key, row in rows.items():
    load = (row.get("agent_connections"), row.get("agent_depth"))
    if key[0] == "softhsm" and load != (key[1], 1):
        problems.append(f"{key}: agent load {load[0]}x{load[1]}, expected {key[1]}x1")
if problems:
    print("bench smoke test failed:\n  " + "\n  ".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"bench smoke test: {len(rows)} rows ({len(floors)} with the floor), "
      f"{len(document['runs'])} runs, tables and JSON ok")
PY
