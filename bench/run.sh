#!/usr/bin/env bash
# bench/run.sh: the whole benchmark in one command (bench/README.md).
#
# On one fresh SoftHSMv2 token in a temporary directory, with one ES256 key, it measures signing
# throughput and latency for each concurrency in a list, three ways:
#   direct  hsm-bench-direct: the PKCS#11 module loaded in-process, one session per thread;
#   agent   `hsmctl bench`: through hsm-agent and the hsm::client library;
#   p11kit  hsm-bench-direct over p11-kit-client.so, talking to `p11-kit server` (remoting);
# first on plain SoftHSMv2, then behind the fault-injecting module adding 2 ms to every C_Sign
# (a network HSM). On plain SoftHSMv2 it also measures the process-boundary floor, the best any
# sidecar could do here:
#   floor   hsm-bench-floor: the same signatures behind a minimal Unix-socket sidecar;
#   uds_rtt hsm-bench-floor --ping: the bare round trip over that socket, without signing.
# It prints the tables and writes every number as JSON.
#
# Binaries come from the environment (HSM_BENCH_AGENT, HSM_BENCH_DIRECT, HSM_BENCH_FLOOR,
# HSM_BENCH_HSMCTL, HSM_BENCH_FAULT_MODULE) or from the build directory, where they are built or
# brought up to date first (configuring it when it does not exist yet), unless --no-build.
set -euo pipefail

readonly repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/softhsm_token.sh
source "$repo/bench/softhsm_token.sh"
readonly softhsm_module=${HSM_BENCH_SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}

usage() {
  cat <<EOF
usage: bench/run.sh [options]

  --duration S              measured seconds per run (default 5)
  --warmup-ms MS            unmeasured signing before each run (default 500)
  --repeat N                run every measurement N times, interleaved, and keep each mode's
                            best round (default 1; use 3 on a machine shared with other work)
  --concurrency LIST        concurrencies on plain SoftHSMv2, comma-separated (default 1,2)
  --latency-concurrency LIST
                            concurrencies with 2 ms per C_Sign (default 1,16,64)
  --delay-ms MS             latency added to each C_Sign in that part (default 2)
  --agent-connections N     in the latency part, above concurrency N the agent bench uses N
                            connections with concurrency/N requests in flight on each
                            (default 2); on plain SoftHSMv2 the agent always has one connection
                            per caller, one request in flight on each, like the floor
  --busy-poll LIST          latency mode (issue 21): also run agents started with --busy-poll-us
                            N for each N in LIST, on plain SoftHSMv2 at every concurrency and
                            on the slow module at concurrency 1 (default 50,200; "" skips it)
  --quick                   CI smoke test: 1 s runs, concurrency 1, latency part at 1 and 16,
                            no latency mode
  --build-dir DIR           CMake build directory (default: build/bench, else an existing
                            build/release or build/dev; configured and built when missing)
  --json-out FILE           where the JSON goes (default bench/results/latest.json)
  --no-build                use the binaries in the build directory as they are (by default
                            they are brought up to date first; missing ones are always built)
  --keep                    keep the temporary directory (token, logs) and print its path
  -h, --help                this text
EOF
}

duration_s=5
repeat=1
warmup_ms=500
concurrency=1,2
latency_concurrency=1,16,64
delay_ms=2
agent_connections=2
busy_poll=50,200
build_dir=
json_out=$repo/bench/results/latest.json
keep=0
build=1
while (($#)); do
  case $1 in
    --duration) duration_s=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --warmup-ms) warmup_ms=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --latency-concurrency) latency_concurrency=$2; shift 2 ;;
    --delay-ms) delay_ms=$2; shift 2 ;;
    --agent-connections) agent_connections=$2; shift 2 ;;
    --busy-poll) busy_poll=$2; shift 2 ;;
    --quick) duration_s=1; warmup_ms=200; concurrency=1; latency_concurrency=1,16; busy_poll=; shift ;;
    --build-dir) build_dir=$2; shift 2 ;;
    --json-out) json_out=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --no-build) build=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "run.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

die() { echo "run.sh: $*" >&2; exit 1; }
note() { echo "run.sh: $*" >&2; }

positive_int() { [[ $1 =~ ^[1-9][0-9]*$ ]] || die "$2 must be a positive integer, got '$1'"; }
positive_int "$duration_s" --duration
positive_int "$delay_ms" --delay-ms
positive_int "$repeat" --repeat
positive_int "$agent_connections" --agent-connections
[[ $warmup_ms =~ ^[0-9]+$ ]] || die "--warmup-ms must be a number, got '$warmup_ms'"
warmup_s=$(printf '%d.%03d' $((warmup_ms / 1000)) $((warmup_ms % 1000)))  # for hsmctl bench
IFS=, read -r -a plain_levels <<<"$concurrency"
IFS=, read -r -a latency_levels <<<"$latency_concurrency"
IFS=, read -r -a busy_polls <<<"$busy_poll"
for n in "${busy_polls[@]}"; do [[ $n =~ ^[1-9][0-9]*$ ]] || die "--busy-poll takes positive numbers, got '$n'"; done
for level in "${plain_levels[@]}" "${latency_levels[@]}"; do positive_int "$level" concurrency; done

for tool in softhsm2-util p11-kit python3; do
  command -v "$tool" >/dev/null || die "$tool is not installed (apt-get install softhsm2 p11-kit python3)"
done
[[ -r $softhsm_module ]] || die "no SoftHSMv2 module at $softhsm_module"
p11kit_client=${HSM_BENCH_P11KIT_CLIENT:-}
if [[ -z $p11kit_client ]]; then
  for candidate in /usr/lib/*/pkcs11/p11-kit-client.so /usr/lib/pkcs11/p11-kit-client.so; do
    [[ -r $candidate ]] && { p11kit_client=$candidate; break; }
  done
fi
[[ -n $p11kit_client ]] || die "p11-kit-client.so not found (apt-get install p11-kit-modules)"

# ---- Binaries ----------------------------------------------------------------------------------

if [[ -z $build_dir ]]; then
  build_dir=$repo/build/bench
  for candidate in "$repo/build/bench" "$repo/build/release" "$repo/build/dev"; do
    [[ -f $candidate/CMakeCache.txt ]] && { build_dir=$candidate; break; }
  done
fi
build_dir=$(realpath -m "$build_dir")
# Target name -> file (environment override, else its place in the build directory). Paths are
# made absolute: p11-kit resolves a relative --provider against its own module directory.
declare -A binary=(
  [hsm-agent]=${HSM_BENCH_AGENT:-$build_dir/agent/hsm-agent}
  [hsm-bench-direct]=${HSM_BENCH_DIRECT:-$build_dir/bench/hsm-bench-direct}
  [hsm-bench-floor]=${HSM_BENCH_FLOOR:-$build_dir/bench/hsm-bench-floor}
  [hsmctl]=${HSM_BENCH_HSMCTL:-$build_dir/client/hsmctl}
  [hsm_fault_pkcs11]=${HSM_BENCH_FAULT_MODULE:-$build_dir/tests/fault_module/libhsm_fault_pkcs11.so}
)
declare -A from_env=(
  [hsm-agent]=${HSM_BENCH_AGENT:+1} [hsm-bench-direct]=${HSM_BENCH_DIRECT:+1}
  [hsm-bench-floor]=${HSM_BENCH_FLOOR:+1}
  [hsmctl]=${HSM_BENCH_HSMCTL:+1} [hsm_fault_pkcs11]=${HSM_BENCH_FAULT_MODULE:+1}
)
# The targets to (re)build: those taken from the build directory (an up-to-date build is a
# no-op), unless --no-build; a binary given in the environment must already exist.
to_build=()
for target in "${!binary[@]}"; do
  binary[$target]=$(realpath -m "${binary[$target]}")
  if [[ -n ${from_env[$target]} ]]; then
    [[ -e ${binary[$target]} ]] || die "$target: no such file ${binary[$target]} (from the environment)"
  elif ((build)) || [[ ! -e ${binary[$target]} ]]; then
    to_build+=("$target")
  fi
done
if ((${#to_build[@]})); then
  if [[ ! -f $build_dir/CMakeCache.txt ]]; then
    note "configuring $build_dir"
    cmake -S "$repo" -B "$build_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHSM_BUILD_BENCH=ON \
      -DHSM_BUILD_AGENT=ON -DHSM_BUILD_TESTS=ON >&2
  fi
  note "building ${to_build[*]} in $build_dir"
  cmake --build "$build_dir" -j"$(nproc)" --target "${to_build[@]}" >&2 ||
    die "cannot build ${to_build[*]} in $build_dir"
  for target in "${to_build[@]}"; do
    [[ -e ${binary[$target]} ]] || die "$target was built but is not at ${binary[$target]}"
  done
fi
if [[ -f $build_dir/CMakeCache.txt ]]; then
  build_type=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$build_dir/CMakeCache.txt")
  case $build_type in
    Release | RelWithDebInfo) ;;
    *) note "warning: $build_dir is a '$build_type' build; numbers from it are not representative" ;;
  esac
  if grep -q -- '-fsanitize' "$build_dir/CMakeCache.txt"; then
    note "warning: $build_dir is built with sanitizers; numbers from it are not representative"
  fi
fi

# ---- The token -----------------------------------------------------------------------------------

work=$(mktemp -d "${TMPDIR:-/tmp}/hsm-bench.XXXXXX")
pids=()  # every process this script started and still owns
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if ((keep)); then note "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

readonly token_label=hsm-bench
readonly kid=bench-es256
make_throwaway_token "$work" "$token_label" || die "cannot create the token"
"${binary[hsm-bench-direct]}" --module "$softhsm_module" --token-label "$token_label" \
  --pin-file "$work/user.pin" --kid "$kid" --create-key --setup-only 2>"$work/setup.log" ||
  { cat "$work/setup.log" >&2; die "cannot create the ES256 key"; }

# The latency-adding module: forwards to SoftHSMv2, sleeping before every C_Sign.
export HSM_FAULT_TARGET=$softhsm_module
printf 'C_Sign delay_ms=%s\n' "$delay_ms" >"$work/fault-control"

# ---- Servers -------------------------------------------------------------------------------------

agent_pid= agent_socket=
# The agent runs with its default tuning (issue 16: "with default flags"): no --sessions, no
# limits. The flags below only say where things go: the token, the socket, the audit log (a
# file), quieter logs, and no HTTP endpoint (so no fixed port; the metrics are still counted).
start_agent() {  # module name [extra agent flags...]
  agent_socket=$work/agent-$2.sock
  "${binary[hsm-agent]}" --module "$1" --token-label "$token_label" --pin-file "$work/user.pin" \
    --socket "$agent_socket" --metrics-listen "" --log-level warn \
    --audit-log "$work/audit-$2.log" "${@:3}" >"$work/agent-$2.out" 2>"$work/agent-$2.err" &
  agent_pid=$!
  pids+=("$agent_pid")
  local tries
  for ((tries = 0; tries < 200; tries++)); do
    [[ -S $agent_socket ]] && break
    kill -0 "$agent_pid" 2>/dev/null || { cat "$work/agent-$2.err" >&2; die "hsm-agent exited"; }
    sleep 0.1
  done
  [[ -S $agent_socket ]] || { cat "$work/agent-$2.err" >&2; die "hsm-agent did not listen"; }
  # The key is there and is ES256, seen through the agent.
  "${binary[hsmctl]}" --socket "$agent_socket" pubkey "$kid" >/dev/null 2>>"$work/agent-$2.err" ||
    { cat "$work/agent-$2.err" >&2; die "the agent cannot see the key"; }
}

p11kit_pid= p11kit_address=
start_p11kit_server() {  # module name
  local env_file=$work/p11-kit-$2.env
  # Created here: the background child opens its own redirection, maybe after the first look
  # below (a read of a file not yet there failed the run under set -e).
  : >"$env_file"
  # -f: stay in the foreground (a child we own); -s: print the address as shell assignments.
  XDG_RUNTIME_DIR=$work p11-kit server -f -s --provider "$1" "pkcs11:token=$token_label" \
    >"$env_file" 2>"$work/p11-kit-$2.err" &
  p11kit_pid=$!
  pids+=("$p11kit_pid")
  local tries
  for ((tries = 0; tries < 100; tries++)); do
    p11kit_address=$(sed -n 's/^P11_KIT_SERVER_ADDRESS=\([^;]*\);.*/\1/p' "$env_file")
    [[ -n $p11kit_address ]] && return 0
    kill -0 "$p11kit_pid" 2>/dev/null || break
    sleep 0.1
  done
  cat "$work/p11-kit-$2.err" >&2
  die "p11-kit server did not start"
}

floor_pid='' floor_socket=''
start_floor_server() {  # module name
  floor_socket=$work/floor-$2.sock
  "${binary[hsm-bench-floor]}" --serve "$floor_socket" --module "$1" --token-label "$token_label" \
    --pin-file "$work/user.pin" --kid "$kid" >"$work/floor-$2.out" 2>"$work/floor-$2.err" &
  floor_pid=$!
  pids+=("$floor_pid")
  local tries
  for ((tries = 0; tries < 200; tries++)); do
    grep -q '^listening on ' "$work/floor-$2.out" 2>/dev/null && return 0
    kill -0 "$floor_pid" 2>/dev/null || break
    sleep 0.1
  done
  cat "$work/floor-$2.err" >&2
  die "hsm-bench-floor --serve did not start"
}

# Latency mode: one more agent per --busy-poll value, idle (and so not polling) while the others
# are measured. poll_agents[N]=socket, poll_agent_pids[N]=pid.
declare -A poll_agents=() poll_agent_pids=()
start_poll_agents() {  # module name
  local n plain_socket=$agent_socket plain_pid=$agent_pid
  for n in "${busy_polls[@]}"; do
    start_agent "$1" "$2-poll$n" --busy-poll-us "$n"
    poll_agents[$n]=$agent_socket poll_agent_pids[$n]=$agent_pid
  done
  agent_socket=$plain_socket agent_pid=$plain_pid
}

stop_servers() {
  local pid
  for pid in "$agent_pid" "$p11kit_pid" "$floor_pid" "${poll_agent_pids[@]}"; do
    [[ -n $pid ]] || continue
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  agent_pid='' p11kit_pid='' floor_pid=''
  poll_agents=() poll_agent_pids=()
  pids=()
}

# ---- Runs ----------------------------------------------------------------------------------------

results=$work/results.jsonl
: >"$results"
failed=0
duration_ms=$((duration_s * 1000))

# Runs one measurement and appends its JSON line, tagged with scenario and mode, to $results.
record() {  # scenario level mode command...
  local scenario=$1 level=$2 mode=$3 line
  shift 3
  if line=$("$@" 2>>"$work/bench.err"); then
    :
  else
    note "$scenario $mode failed (exit $?): $(tail -n 3 "$work/bench.err")"
    failed=1
  fi
  [[ -n $line ]] || line='{"ops":0,"errors":1,"first_error":"no result"}'
  python3 - "$scenario" "$level" "$mode" "$line" >>"$results" <<'EOF'
import json, sys
run = json.loads(sys.argv[4])
run["program"] = run.pop("mode", None)
run.update(scenario=sys.argv[1], level=int(sys.argv[2]), mode=sys.argv[3])
print(json.dumps(run))
EOF
}

# with_floor: 1 to also measure the floor and the bare round trip (plain SoftHSMv2 only).
run_scenario() {  # scenario module with_floor levels...
  local scenario=$1 module=$2 with_floor=$3 level connections depth
  shift 3
  local levels=("$@")
  start_agent "$module" "$scenario"
  start_poll_agents "$module" "$scenario"
  start_p11kit_server "$module" "$scenario"
  if ((with_floor)); then start_floor_server "$module" "$scenario"; fi
  local common=(--token-label "$token_label" --pin-file "$work/user.pin" --kid "$kid"
    --duration-ms "$duration_ms" --warmup-ms "$warmup_ms")
  local round of modes="direct, agent, p11-kit"
  if ((with_floor)); then modes+=", floor, uds round trip"; fi
  for level in "${levels[@]}"; do
    for ((round = 1; round <= repeat; round++)); do
      of=
      ((repeat == 1)) || of=", round $round of $repeat"
      note "$scenario, concurrency $level: $modes (${duration_s} s each$of)"
      record "$scenario" "$level" direct "${binary[hsm-bench-direct]}" --module "$module" \
        --threads "$level" "${common[@]}"
      # One synchronous caller per connection, one request in flight on each (like direct's
      # threads and the floor's connections): always on plain SoftHSMv2, where the agent is
      # compared with the floor, and in the latency part up to --agent-connections; above that,
      # --agent-connections connections, each pipelining its share of the requests.
      if ((with_floor || level <= agent_connections)); then
        connections=$level depth=1
      else
        connections=$agent_connections depth=$(((level + agent_connections - 1) / agent_connections))
      fi
      record "$scenario" "$level" agent "${binary[hsmctl]}" --socket "$agent_socket" --json \
        bench "$kid" --connections "$connections" --depth "$depth" --duration "$duration_s" \
        --warmup "$warmup_s" --server-pid "$agent_pid"
      # Latency mode: the same load on the polling agents, with the client polling for the same
      # budget (both sides of the socket; on the slow module at 1 only).
      local n
      if ((with_floor || level == 1)); then
        for n in "${busy_polls[@]}"; do
          record "$scenario" "$level" "agent_poll$n" "${binary[hsmctl]}" \
            --socket "${poll_agents[$n]}" --json bench "$kid" --connections "$connections" \
            --depth "$depth" --duration "$duration_s" --warmup "$warmup_s" \
            --server-pid "${poll_agent_pids[$n]}" --busy-poll-us "$n"
        done
      fi
      P11_KIT_SERVER_ADDRESS=$p11kit_address record "$scenario" "$level" p11kit \
        "${binary[hsm-bench-direct]}" --module "$p11kit_client" --threads "$level" "${common[@]}" \
        --server-pid "$p11kit_pid"
      if ((with_floor)); then
        local floor_run=("${binary[hsm-bench-floor]}" --connect "$floor_socket" --threads "$level"
          --duration-ms "$duration_ms" --warmup-ms "$warmup_ms" --server-pid "$floor_pid")
        record "$scenario" "$level" floor "${floor_run[@]}"
        record "$scenario" "$level" uds_rtt "${floor_run[@]}" --ping
      fi
    done
  done
  stop_servers
}

readonly load_before=$(cut -d' ' -f1-3 /proc/loadavg)
run_scenario softhsm "$softhsm_module" 1 "${plain_levels[@]}"
HSM_FAULT_CONTROL=$work/fault-control run_scenario "softhsm+${delay_ms}ms" \
  "${binary[hsm_fault_pkcs11]}" 0 "${latency_levels[@]}"

# ---- Table and JSON ------------------------------------------------------------------------------

mkdir -p "$(dirname "$json_out")"
readonly load_after=$(cut -d' ' -f1-3 /proc/loadavg)
(python3 - "$results" "$json_out" "$load_before $load_after" "$duration_s" "$delay_ms" "$agent_connections" \
  "$repeat" <<'EOF'
import json, os, platform, sys
from collections import OrderedDict

results_path, json_out, loads, duration_s, delay_ms, agent_connections, repeat = sys.argv[1:8]
runs = [json.loads(line) for line in open(results_path)]

def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()

# One row per (scenario, concurrency level), in the order they ran. With --repeat, each mode's
# best round (highest throughput, error-free first) stands for it: other load on the machine
# only ever makes a round slower.
rows = OrderedDict()
for run in runs:
    modes = rows.setdefault((run["scenario"], run["level"]), {})
    best = modes.get(run["mode"])
    rank = lambda r: (r.get("errors", 1) == 0, r.get("throughput_per_s", 0.0))
    if best is None or rank(run) > rank(best):
        modes[run["mode"]] = run

def ratio(a, b):
    return round(a / b, 3) if a and b else None

def difference(a, b):
    return round(a - b, 1) if a is not None and b is not None else None

def cell(modes, m):
    """One mode's numbers in a table row (errors 1 and no numbers when it did not run)."""
    run = modes.get(m, {})
    used = run.get("cpu_us_per_op")
    cpu = None if not used else {
        "client": used.get("client"), "server": used.get("server"),
        "total": round(used.get("client", 0) + used.get("server", 0), 1)}
    return {"throughput_per_s": run.get("throughput_per_s", 0.0),
            "p50_us": run.get("latency_us", {}).get("p50"),
            "p99_us": run.get("latency_us", {}).get("p99"),
            "cpu_us_per_op": cpu,
            "errors": run.get("errors", 1)}

table = []
for (scenario, level), modes in rows.items():
    cells = {m: cell(modes, m) for m in ("direct", "agent", "p11kit")}
    tput = {m: c["throughput_per_s"] for m, c in cells.items()}
    agent_run = modes.get("agent", {})
    table.append({
        "scenario": scenario, "concurrency": level, **cells,
        # How the agent was loaded: connections x requests in flight on each.
        "agent_connections": agent_run.get("connections"),
        "agent_depth": agent_run.get("depth"),
        "agent_over_direct": ratio(tput["agent"], tput["direct"]),
        "agent_over_p11kit": ratio(tput["agent"], tput["p11kit"]),
        "agent_added_p50_us": difference(cells["agent"]["p50_us"], cells["direct"]["p50_us"]),
    })

# The process-boundary floor (plain SoftHSMv2 rows only): the same signature behind a minimal
# Unix-socket sidecar, and the bare round trip over that socket.
floor_table = []
for (scenario, level), modes in rows.items():
    if "floor" not in modes and "uds_rtt" not in modes:
        continue
    cells = {m: cell(modes, m) for m in ("direct", "agent", "p11kit", "floor", "uds_rtt")}
    tput = {m: c["throughput_per_s"] for m, c in cells.items()}
    p50 = {m: c["p50_us"] for m, c in cells.items()}
    # Server side only: the agent process's CPU per signature, and the floor server process's
    # (each read from /proc by the load client over the measured window; the clients excluded).
    server_cpu = {m: (cells[m]["cpu_us_per_op"] or {}).get("server") for m in ("agent", "floor")}
    floor_table.append({
        "scenario": scenario, "concurrency": level,
        "floor": cells["floor"], "uds_rtt": cells["uds_rtt"],
        "floor_over_direct": ratio(tput["floor"], tput["direct"]),
        "floor_over_p11kit": ratio(tput["floor"], tput["p11kit"]),
        "floor_added_p50_us": difference(p50["floor"], p50["direct"]),
        "uds_rtt_p50_us": p50["uds_rtt"],
        "agent_over_floor": ratio(tput["agent"], tput["floor"]),
        "agent_over_floor_p50_us": difference(p50["agent"], p50["floor"]),
        "floor_server_cpu_us_per_op": server_cpu["floor"],
        "agent_server_cpu_us_per_op": server_cpu["agent"],
        "agent_over_floor_server_cpu": ratio(server_cpu["agent"], server_cpu["floor"]),
    })

def fmt(value, spec):
    return "-" if value is None else format(value, spec)

header = (f"{'scenario':<14} {'conc':>4} | {'direct/s':>8} {'p50':>7} {'p99':>7} | "
          f"{'agent/s':>8} {'p50':>7} {'p99':>7} | {'p11kit/s':>8} {'p50':>7} {'p99':>7} | "
          f"{'ag/dir':>6} {'ag/p11':>6} {'+p50':>6}")
lines = [header, "-" * len(header)]
for row in table:
    cells = [f"{row['scenario']:<14} {row['concurrency']:>4}"]
    for m in ("direct", "agent", "p11kit"):
        r = row[m]
        mark = "!" if r["errors"] else " "
        cells.append(f"{r['throughput_per_s']:>8.0f} {fmt(r['p50_us'], '7.1f')} "
                     f"{fmt(r['p99_us'], '7.1f')}{mark}")
    cells.append(f"{fmt(row['agent_over_direct'], '6.2f')} {fmt(row['agent_over_p11kit'], '6.2f')} "
                 f"{fmt(row['agent_added_p50_us'], '6.1f')}")
    lines.append(" | ".join(cells))
lines.append("throughput in signatures/s; latencies in microseconds; ag/dir and ag/p11 are "
             "throughput ratios; +p50 = agent p50 - direct p50; ! = the run had errors")
def agent_load(row):
    c, d = row["agent_connections"], row["agent_depth"]
    return "?" if c is None or d is None else f"{c}x{d}"
lines.append("agent load, connections x requests in flight on each: " + ", ".join(
    f"{row['scenario']} {row['concurrency']}: {agent_load(row)}" for row in table) +
    " (direct, p11kit and floor: one thread per concurrent caller, one request in flight each)")

if floor_table:
    # Each p50/p99 block is followed by its error mark ("!" or a blank), as in the main table.
    floor_header = (f"{'scenario':<14} {'conc':>4} | {'floor/s':>8} {'p50':>7} {'p99':>7}  | "
                    f"{'fl/dir':>6} {'fl+p50':>6} | {'rtt p50':>7}  | {'ag/fl':>6} {'ag-fl':>6} | "
                    f"{'cpu/sig':>7}")
    lines += ["", "process-boundary floor: the same signature behind a minimal Unix-socket sidecar "
              "(no sidecar can beat it here)", floor_header, "-" * len(floor_header)]
    for row in floor_table:
        f, rtt = row["floor"], row["uds_rtt"]
        cpu = f["cpu_us_per_op"]
        lines.append(
            f"{row['scenario']:<14} {row['concurrency']:>4} | "
            f"{f['throughput_per_s']:>8.0f} {fmt(f['p50_us'], '7.1f')} {fmt(f['p99_us'], '7.1f')}"
            f"{'!' if f['errors'] else ' '} | "
            f"{fmt(row['floor_over_direct'], '6.2f')} {fmt(row['floor_added_p50_us'], '6.1f')} | "
            f"{fmt(row['uds_rtt_p50_us'], '7.1f')}{'!' if rtt['errors'] else ' '} | "
            f"{fmt(row['agent_over_floor'], '6.2f')} {fmt(row['agent_over_floor_p50_us'], '6.1f')} | "
            f"{fmt(cpu and cpu['total'], '7.1f')}")
    lines.append("floor: one server thread per connection reads 32 bytes, signs inline on its own "
                 "session (as direct) and writes 64 back; rtt p50 = the bare round trip over that "
                 "socket (no signing)")
    lines.append("fl/dir = floor/direct throughput; fl+p50 = floor p50 - direct p50; ag/fl = "
                 "agent/floor throughput; ag-fl = agent p50 - floor p50; cpu/sig = floor CPU per "
                 "signature, client + server (each apart in the CPU table below)")

# CPU per signature: independent of other load on the machine, unlike the wall-clock numbers.
def cpu_cell(r, split):
    c = r["cpu_us_per_op"]
    if not c:
        return f"{'-':>23}"
    if not split:
        return f"{c['total']:>23.1f}"
    return f"{c['client']:>6.1f} + {c['server'] or 0:>6.1f} = {c['total']:>5.1f}"
cpu_header = (f"{'scenario':<14} {'conc':>4} | {'direct':>23} | {'agent: client + agent':>23} | "
              f"{'p11kit: client + srv':>23} | {'floor: client + srv':>23}")
lines += ["", "CPU time per signature, microseconds (all cores; client + server process)",
          cpu_header, "-" * len(cpu_header)]
floor_cells = {(row["scenario"], row["concurrency"]): row["floor"] for row in floor_table}
for row in table:
    floor_cell = floor_cells.get((row["scenario"], row["concurrency"]))
    lines.append(f"{row['scenario']:<14} {row['concurrency']:>4} | "
                 f"{cpu_cell(row['direct'], False)} | {cpu_cell(row['agent'], True)} | "
                 f"{cpu_cell(row['p11kit'], True)} | "
                 f"{cpu_cell(floor_cell, True) if floor_cell else format('-', '>23')}")

# Issue 7's targets, as information (a benchmark is not a test gate). After each target on plain
# SoftHSMv2, the same ratio for the floor: whether any sidecar could meet the target here at all.
targets = []
floor_bounds = []
target_lines = []
def target(name, value, ok):
    targets.append({"target": name, "value": value, "met": ok})
    target_lines.append(f"  {'met ' if ok else 'MISS'}  {name}: {fmt(value, '.2f')}")
def floor_bound(name, value, comparison, goal, unit="", aside=""):
    reachable = None if value is None else (value >= goal if comparison == ">=" else value <= goal)
    floor_bounds.append({"bound": name, "value": value, "target": f"{comparison} {goal}",
                         "target_within_reach": reachable})
    verdict = ("" if reachable is None else
               f", so {comparison} {goal}{unit} is {'within' if reachable else 'out of'} reach")
    target_lines.append(f"  info  {name} (the floor: no sidecar can beat it here): "
                        f"{fmt(value, '.2f')}{unit}{verdict}{aside}")
floors = {(row["scenario"], row["concurrency"]): row for row in floor_table}
for row in table:
    s, c = row["scenario"], row["concurrency"]
    fl = floors.get((s, c))
    if s == "softhsm" and c in (1, 2):
        v = row["agent_over_direct"]
        target(f"{s} c={c}: agent/direct >= 0.9", v, v is not None and v >= 0.9)
        if fl:
            floor_bound(f"{s} c={c}: floor/direct", fl["floor_over_direct"], ">=", 0.9)
        v = row["agent_over_p11kit"]
        target(f"{s} c={c}: agent/p11kit >= 2.5", v, v is not None and v >= 2.5)
        if fl:
            floor_bound(f"{s} c={c}: floor/p11kit", fl["floor_over_p11kit"], ">=", 2.5)
    if s == "softhsm" and c == 1:
        v = row["agent_added_p50_us"]
        target(f"{s} c=1: agent p50 - direct p50 <= 20 us", v, v is not None and v <= 20)
        if fl:
            floor_bound(f"{s} c=1: floor p50 - direct p50", fl["floor_added_p50_us"], "<=", 20,
                        " us", f" (a bare round trip alone: {fmt(fl['uds_rtt_p50_us'], '.1f')} us)")
    if s != "softhsm" and c == 64:
        v = row["agent_over_direct"]
        target(f"{s} c=64: agent/direct >= 0.85", v, v is not None and v >= 0.85)
lines.append("")
lines.append("issue 7 targets (information, not a gate):")
lines += target_lines

# Issue 16's targets: each a ratio of two numbers from this run, PASS or MISS; "n/a" when this
# run has no row for it (--quick, or other --concurrency lists). Information, not a gate.
issue16 = []
issue16_lines = []
plain, slow = "softhsm", f"softhsm+{delay_ms}ms"
table_rows = {(row["scenario"], row["concurrency"]): row for row in table}
def issue16_target(scenario, level, quantity, comparison, goal, over, under, unit="/s",
                   missing="not in this run"):
    """over and under: (label, value, errors) of the numerator and the denominator, or None when
    this run has no such row."""
    broken = [side[0] for side in (over, under) if side and side[2]]
    if broken:
        missing = f"the {' and '.join(broken)} run had errors"
        over = under = None
    value = ratio(over[1], under[1]) if over and under else None
    status = ("n/a" if value is None else
              "PASS" if (value >= goal if comparison == ">=" else value <= goal) else "MISS")
    name = f"{scenario} c={level}: {quantity} {comparison} {goal:.2f}"
    entry = {"target": name, "scenario": scenario, "concurrency": level, "quantity": quantity,
             "comparison": comparison, "goal": goal, "value": value, "status": status}
    if over and under:
        entry.update(numerator={"what": over[0], "value": over[1]},
                     denominator={"what": under[0], "value": under[1]})
        spec = ".0f" if unit == "/s" else ".1f"
        detail = f" ({over[0]} {over[1]:{spec}}{unit}, {under[0]} {under[1]:{spec}}{unit})"
    else:
        entry["reason"] = missing
        detail = f" ({missing})"
    issue16.append(entry)
    issue16_lines.append(f"  {status:<4}  {name}: {fmt(value, '.3f')}{detail}")
def measured(row, mode, label):
    """(label, throughput, errors) of one mode in a row, or None when the row is missing."""
    return None if row is None else (label, row[mode]["throughput_per_s"], row[mode]["errors"])
for level in (1, 2):
    row, fl = table_rows.get((plain, level)), floors.get((plain, level))
    issue16_target(plain, level, "agent/floor throughput", ">=", 0.95 if level == 1 else 0.90,
                   measured(row, "agent", "agent"), measured(fl, "floor", "floor"))
    if level == 2:
        issue16_target(plain, level, "agent/p11kit throughput", ">=", 1.5,
                       measured(row, "agent", "agent"), measured(row, "p11kit", "p11kit"))
def server_cpu(level, mode, label):
    """(label, server-side CPU per signature, errors) of the agent or the floor at a plain level,
    or None when this run has no such row or no server CPU for it."""
    fl = floors.get((plain, level))
    value = fl and fl[f"{mode}_server_cpu_us_per_op"]
    if not value:
        return None
    cells = table_rows[(plain, level)] if mode == "agent" else fl
    return (label, value, cells[mode]["errors"])
for level in (1, 2):
    issue16_target(plain, level, "agent/floor server CPU per signature", "<=", 1.2,
                   server_cpu(level, "agent", "agent process"),
                   server_cpu(level, "floor", "floor server"), " us")
for level, goal in ((16, 0.95), (64, 0.90)):
    row = table_rows.get((slow, level)) if int(delay_ms) == 2 else None
    issue16_target(slow, level, "agent (default flags)/direct throughput", ">=", goal,
                   measured(row, "agent", "agent"), measured(row, "direct", "direct"),
                   missing="not in this run" if int(delay_ms) == 2 else
                   f"the target is for the 2 ms module; this run added {delay_ms} ms")
lines.append("")
lines.append("issue 16 targets (ratios within this run; information, not a gate):")
lines += issue16_lines
lines += [
    "  plain SoftHSMv2 at c: the agent and the floor each serve c connections with 1 request "
    "in flight on each (the agent load above); p11kit: c threads, 1 call each, through "
    "p11-kit-client.so",
    "  server CPU: the agent process's own CPU per signature over the floor server process's "
    "(the load clients excluded)",
    f"  {delay_ms} ms module at c: the agent as started with default flags (no --sessions) and "
    "the agent load above, against direct's c threads with a session each"]

# Latency mode (issue 21): the agents started with --busy-poll-us N next to the one without, on
# the same load, each measured by an hsmctl bench whose calls poll for N us too (both sides).
latency = []
latency_lines = []
for (scenario, level), modes in rows.items():
    polls = sorted((int(m[len("agent_poll"):]), m) for m in modes if m.startswith("agent_poll"))
    if not polls:
        continue
    fl = floors.get((scenario, level))
    base = {m: cell(modes, m) for m in ("direct", "agent")}
    floor_cell = fl["floor"] if fl else None
    def line(label, c):
        cpu = c["cpu_us_per_op"] if c else None
        return (f"  {scenario:<14} {level:>4} {label:<14} | "
                f"{(c or {}).get('throughput_per_s', 0):>8.0f} {fmt((c or {}).get('p50_us'), '7.1f')} "
                f"{fmt((c or {}).get('p99_us'), '7.1f')}{'!' if c and c['errors'] else ' '} | "
                f"{cpu_cell(c, True) if c else format('-', '>23')}")
    latency_lines.append(line("direct", base["direct"]))
    if floor_cell:
        latency_lines.append(line("floor", floor_cell))
    latency_lines.append(line("agent, off", base["agent"]))
    for n, m in polls:
        c = cell(modes, m)
        off = base["agent"]
        entry = {"scenario": scenario, "concurrency": level, "busy_poll_us": n, **{m: c},
                 "over_direct": ratio(c["throughput_per_s"], base["direct"]["throughput_per_s"]),
                 "over_floor": ratio(c["throughput_per_s"], floor_cell and floor_cell["throughput_per_s"]),
                 "over_off": ratio(c["throughput_per_s"], off["throughput_per_s"]),
                 "cpu_over_off": ratio((c["cpu_us_per_op"] or {}).get("total"),
                                       (off["cpu_us_per_op"] or {}).get("total"))}
        # The targets of issue 21 for this row, PASS or MISS (information, not a gate).
        checks = []
        if scenario == plain and level == 1:
            checks += [("poll/direct >= 0.80", entry["over_direct"], 0.80),
                       ("poll/floor >= 1.50", entry["over_floor"], 1.50)]
        if scenario == plain and level == 2:
            checks += [("poll/off >= 1.00", entry["over_off"], 1.00)]
        if scenario != plain and level == 1:
            checks += [("off CPU/poll CPU >= 0.91 (poll CPU within 1.1x)",
                        ratio((off["cpu_us_per_op"] or {}).get("total"),
                              (c["cpu_us_per_op"] or {}).get("total")), 0.91)]
        entry["targets"] = [{"target": t, "value": v,
                             "status": "n/a" if v is None else "PASS" if v >= g else "MISS"}
                            for t, v, g in checks]
        latency.append(entry)
        marks = "; ".join(f"{t['status']} {t['target']}: {fmt(t['value'], '.2f')}"
                          for t in entry["targets"])
        latency_lines.append(line(f"agent, {n} us", c) +
                             f" | x{fmt(entry['over_off'], '.2f')} of off" +
                             (f" | {marks}" if marks else ""))
if latency_lines:
    lines += ["", "latency mode (issue 21): agent --busy-poll-us N and client busy_poll N beside "
              "both off, same load; CPU/sig includes what polling burns",
              f"  {'scenario':<14} {'conc':>4} {'mode':<14} | {'sig/s':>8} {'p50':>7} {'p99':>7}  | "
              f"{'CPU/sig: client + srv':>23}"]
    lines += latency_lines

lines.append("")
lines.append(f"load average (1, 5, 15 min) before: {' '.join(loads.split()[:3])}, "
             f"after: {' '.join(loads.split()[3:])}; {os.cpu_count()} CPUs")
print("\n".join(lines))
document = {
    "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "kernel": platform.release(),
                "loadavg_before": loads.split()[:3], "loadavg_after": loads.split()[3:]},
    "settings": {"duration_s": int(duration_s), "delay_ms": int(delay_ms), "repeat": int(repeat),
                 "agent_connections": int(agent_connections),
                 "signature": "ES256 (CKM_ECDSA over SHA-256 of a 32-byte message)"},
    "table": table,
    "targets": targets,
    "floor_table": floor_table,
    "floor_bounds": floor_bounds,
    "issue16_targets": issue16,
    "latency_mode": latency,
    "runs": runs,
}
with open(json_out, "w") as out:
    json.dump(document, out, indent=2)
    out.write("\n")
sys.exit(3 if any(run.get("errors", 1) for run in runs) else 0)
EOF
) || failed=1
note "JSON written to $json_out"
((failed == 0)) || die "some runs failed or had errors (marked ! in the table; logs: --keep)"
