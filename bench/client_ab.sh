#!/usr/bin/env bash
# bench/client_ab.sh: the client library's cost per call, two builds of it side by side in one
# run (docs/performance.md, "Client machinery"). One throwaway SoftHSMv2 token with one ES256
# key, one hsm-agent; then `hsmctl bench` of each client build in turn, interleaved round by
# round so both see the same machine, at:
#   sync   1 connection x depth 1  (one synchronous caller: the latency of a call)
#   sync2  2 connections x depth 1 (two synchronous callers)
#   async  1 connection x depth 16 (pipelined futures on one connection)
# and prints, per build and load, the median over rounds of throughput, p50 and p99 latency and
# the CPU per signature of the client process and of the agent.
#
#   bench/client_ab.sh --agent PATH --a NAME=HSMCTL --b NAME=HSMCTL [--rounds N] [--duration S]
set -euo pipefail

readonly repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/softhsm_token.sh
source "$repo/bench/softhsm_token.sh"

agent="" a="" b="" rounds=3 duration=3
while (($#)); do
  case $1 in
    --agent) agent=$2; shift 2 ;;
    --a) a=$2; shift 2 ;;
    --b) b=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    *) echo "client_ab.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ -x $agent && $a == *=* && $b == *=* ]] || { sed -n 2,14p "$0" >&2; exit 2; }

work=$(mktemp -d /tmp/hsm-client-ab.XXXXXX)
agent_pid=
cleanup() {
  if [[ -n $agent_pid ]]; then kill "$agent_pid" 2>/dev/null || true; wait "$agent_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

make_throwaway_token "$work" client-ab
"$agent" --module /usr/lib/softhsm/libsofthsm2.so --token-label client-ab \
  --pin-file "$work/user.pin" --socket "$work/agent.sock" --metrics-listen "" --log-level warn \
  --audit-log "$work/audit.log" >"$work/agent.out" 2>"$work/agent.err" &
agent_pid=$!
for _ in $(seq 1 200); do [[ -S $work/agent.sock ]] && break; sleep 0.1; done
[[ -S $work/agent.sock ]] || { cat "$work/agent.err" >&2; exit 1; }
"${b#*=}" --socket "$work/agent.sock" gen ab-key --alg ES256 >/dev/null

loads=("sync 1 1" "sync2 2 1" "async 1 16")
: >"$work/runs.jsonl"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for ((round = 1; round <= rounds; round++)); do
  for load in "${loads[@]}"; do
    read -r name connections depth <<<"$load"
    for build in "$a" "$b"; do
      "${build#*=}" --socket "$work/agent.sock" --json bench ab-key --connections "$connections" \
        --depth "$depth" --duration "$duration" --warmup 0.3 --server-pid "$agent_pid" |
        python3 -c 'import json,sys; r=json.load(sys.stdin); r.update(build=sys.argv[1], load=sys.argv[2]); print(json.dumps(r))' \
          "${build%%=*}" "$name" >>"$work/runs.jsonl"
    done
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; $rounds rounds of ${duration} s"

python3 - "$work/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
builds = list(dict.fromkeys(r["build"] for r in runs))
loads = list(dict.fromkeys(r["load"] for r in runs))
print(f"{'load':<6} {'build':<8} {'sig/s':>8} {'p50 us':>8} {'p99 us':>8} {'client cpu us/sig':>18} {'agent cpu us/sig':>17}")
for load in loads:
    for build in builds:
        rs = [r for r in runs if r["build"] == build and r["load"] == load]
        med = lambda f: statistics.median(f(r) for r in rs)
        print(f"{load:<6} {build:<8} {med(lambda r: r['throughput_per_s']):8.0f} "
              f"{med(lambda r: r['latency_us']['p50']):8.1f} {med(lambda r: r['latency_us']['p99']):8.1f} "
              f"{med(lambda r: r['cpu_us_per_op']['client']):18.1f} {med(lambda r: r['cpu_us_per_op']['server']):17.1f}")
PY
