#!/usr/bin/env bash
# bench/profile.sh: where the time of one `sign` goes, at one connection (docs/performance.md).
#
# On a fresh SoftHSMv2 token with one ES256 key it measures, for direct in-process signing
# (hsm-bench-direct) and for signing through hsm-agent (`hsmctl bench`, 1 connection, depth 1):
#   1. per signature, load-insensitive counts: CPU time and context switches (perf stat, software
#      events: this works in VMs without hardware counters) and system calls (strace -c), of the
#      agent and of the client;
#   2. callgrind instruction counts per signature, split by stage: the agent (instrumentation
#      switched on only while the client signs), the client (hsmctl bench) and direct signing,
#      summarised by callgrind_summary.py. The raw callgrind files stay in the output directory
#      for callgrind_annotate / kcachegrind.
# Needs valgrind, strace and perf (linux-perf); a missing tool skips its part.
#
# With --memory-seconds S (> 0) it also checks issue 7's memory targets (memory_check.py): the
# agent's RSS with 1,000 idle connections, and RSS sampled during S seconds of signing. The agent
# then runs with its default settings (metrics on a free port).
#
#   bench/profile.sh [--build-dir DIR] [--out DIR] [--seconds S] [--callgrind-seconds S]
#                    [--memory-seconds S] [--no-callgrind]
set -euo pipefail

readonly repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/softhsm_token.sh
source "$repo/bench/softhsm_token.sh"
readonly softhsm_module=${HSM_BENCH_SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
build_dir=$repo/build/bench
out=$repo/bench/results/profile
seconds=5
callgrind_seconds=20
memory_seconds=0
callgrind=1
while (($#)); do
  case $1 in
    --build-dir) build_dir=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --callgrind-seconds) callgrind_seconds=$2; shift 2 ;;
    --memory-seconds) memory_seconds=$2; shift 2 ;;
    --no-callgrind) callgrind=0; shift ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "profile.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
die() { echo "profile.sh: $*" >&2; exit 1; }
note() { echo "profile.sh: $*" >&2; }
have() { command -v "$1" >/dev/null; }

agent_bin=${HSM_BENCH_AGENT:-$build_dir/agent/hsm-agent}
direct_bin=${HSM_BENCH_DIRECT:-$build_dir/bench/hsm-bench-direct}
hsmctl_bin=${HSM_BENCH_HSMCTL:-$build_dir/client/hsmctl}
for binary in "$agent_bin" "$direct_bin" "$hsmctl_bin"; do
  [[ -x $binary ]] || die "no $binary (build hsm-agent hsm-bench-direct hsmctl in $build_dir)"
done
summary=$repo/bench/callgrind_summary.py
mkdir -p "$out"
out=$(realpath "$out")

work=$(mktemp -d "${TMPDIR:-/tmp}/hsm-profile.XXXXXX")
agent_pid=
cleanup() {
  [[ -z $agent_pid ]] || { kill -TERM "$agent_pid" 2>/dev/null || true; wait "$agent_pid" 2>/dev/null || true; }
  rm -rf "$work"
}
trap cleanup EXIT

readonly label=hsm-profile kid=bench-es256
make_throwaway_token "$work" "$label" || die "cannot create the token"
direct=("$direct_bin" --module "$softhsm_module" --token-label "$label" --pin-file "$work/user.pin"
  --kid "$kid")
"${direct[@]}" --create-key --setup-only 2>/dev/null

# The agent's settings besides module, token, PIN and socket (the memory check changes them).
agent_settings=(--metrics-listen "" --log-level warn --audit-log "$work/audit.log")
start_agent() {  # [wrapper...]: the agent, optionally under a wrapper (valgrind)
  rm -f "$work/agent.sock"
  "$@" "$agent_bin" --module "$softhsm_module" --token-label "$label" \
    --pin-file "$work/user.pin" --socket "$work/agent.sock" "${agent_settings[@]}" \
    >"$work/agent.out" 2>"$work/agent.err" &
  agent_pid=$!
  local tries
  for ((tries = 0; tries < 600; tries++)); do
    "$hsmctl_bin" --socket "$work/agent.sock" pubkey "$kid" >/dev/null 2>&1 && return 0
    kill -0 "$agent_pid" 2>/dev/null || {
      cp "$work/agent.err" "$out/agent.err" 2>/dev/null || true
      cat "$work/agent.err" >&2
      die "hsm-agent exited (its stderr: $out/agent.err)"
    }
    sleep 0.1
  done
  die "hsm-agent did not answer"
}
stop_agent() {
  kill -TERM "$agent_pid" 2>/dev/null || true
  wait "$agent_pid" 2>/dev/null || true
  agent_pid=
}
bench() {  # seconds [hsmctl bench options...]: one connection, synchronous signs
  local s=$1
  shift
  "$hsmctl_bin" --socket "$work/agent.sock" --json bench "$kid" --duration "$s" --warmup 0 "$@"
}
ops_of() { /usr/bin/python3 -c 'import json,sys; print(json.loads(sys.argv[1])["ops"])' "$1"; }

# ---- 1. CPU, context switches and system calls per signature ----------------------------------

report=$out/per_sign_counts.txt
: >"$report"
per_sign() {  # label ops perf-stat-file
  /usr/bin/python3 - "$@" >>"$report" <<'EOF'
import re, sys
label, ops, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
text = open(path).read()
def value(event):
    m = re.search(r"^\s*([\d.,]+)\s+(?:msec\s+)?" + re.escape(event), text, re.M)
    return float(m.group(1).replace(",", "")) if m else float("nan")
print(f"{label:<28} {value('task-clock') * 1000 / ops:8.1f} us CPU  "
      f"{value('context-switches') / ops:6.2f} context switches   per signature ({ops} signatures)")
EOF
}
syscalls() {  # label ops strace-file
  /usr/bin/python3 - "$@" >>"$report" <<'EOF'
import sys
label, ops, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = []
for line in open(path):
    parts = line.split()
    if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] not in ("total",):
        calls = int(parts[3]); name = parts[-1]
        if calls / ops >= 0.5:
            rows.append((calls / ops, name))
rows.sort(reverse=True)
print(f"{label:<28} system calls per signature: {sum(r[0] for r in rows):.1f} = " +
      ", ".join(f"{name} {n:.1f}" for n, name in rows))
EOF
}

# Direct signing, then the agent and its client, each under `tool...` (perf stat or strace -c:
# both take -o FILE, and -p PID to attach to the running agent); `summary` (per_sign or
# syscalls) reports each file per signature. Files: $work/{direct,agent,client}.<extension>.
count_per_sign() {  # summary extension tool...
  local summary=$1 extension=$2
  shift 2
  local line tool_pid
  line=$("$@" -o "$work/direct.$extension" -- "${direct[@]}" --threads 1 \
    --duration-ms $((seconds * 1000)) --warmup-ms 0)
  "$summary" "direct (one process)" "$(ops_of "$line")" "$work/direct.$extension"
  start_agent
  "$@" -p "$agent_pid" -o "$work/agent.$extension" 2>/dev/null &
  tool_pid=$!
  sleep 0.5
  line=$("$@" -o "$work/client.$extension" -- "$hsmctl_bin" --socket "$work/agent.sock" --json \
    bench "$kid" --duration "$seconds" --warmup 0)
  kill -INT "$tool_pid"; wait "$tool_pid" || true
  "$summary" "agent: hsm-agent" "$(ops_of "$line")" "$work/agent.$extension"
  "$summary" "agent: client (hsmctl bench)" "$(ops_of "$line")" "$work/client.$extension"
  stop_agent
}

if have perf && perf stat -e task-clock true >/dev/null 2>&1; then
  note "CPU and context switches per signature (perf stat, ${seconds} s each)"
  count_per_sign per_sign perf perf stat -e task-clock,context-switches
else
  note "perf stat does not work here: skipping CPU and context switch counts"
fi
if have strace; then
  note "system calls per signature (strace -c, ${seconds} s each)"
  count_per_sign syscalls strace strace -f -c
else
  note "no strace: skipping system call counts"
fi

# ---- 2. Instructions per signature, by stage (callgrind) ----------------------------------------

if ((callgrind)) && have valgrind; then
  note "callgrind: the agent while hsmctl signs for ${callgrind_seconds} s (slow: valgrind)"
  start_agent valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$out/callgrind.agent.%p"
  bench 1 >/dev/null  # warm: sessions open, key cached
  callgrind_control -i on "$agent_pid" >/dev/null 2>&1
  bench "$callgrind_seconds" >/dev/null
  callgrind_control -i off "$agent_pid" >/dev/null 2>&1
  stop_agent
  agent_profile=$(ls -t "$out"/callgrind.agent.* | head -1)

  note "callgrind: the client (hsmctl bench) against the agent, ${callgrind_seconds} s"
  start_agent
  valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.client" "$hsmctl_bin" \
    --socket "$work/agent.sock" --json bench "$kid" --duration "$callgrind_seconds" --warmup 0 \
    >/dev/null 2>"$work/valgrind-client.err"
  stop_agent

  note "callgrind: direct in-process signing, ${callgrind_seconds} s"
  valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.direct" "${direct[@]}" \
    --threads 1 --duration-ms $((callgrind_seconds * 1000)) --warmup-ms 0 >/dev/null \
    2>"$work/valgrind-direct.err"

  {
    echo
    /usr/bin/python3 "$summary" "$agent_profile" --per '^C_Sign$' --calls 'malloc=^malloc$' --title "hsm-agent, per sign" \
      'token call: Worker::run=Worker::run\(' \
      '  KeyService::execute=KeyService::execute\(' \
      '    C_SignInit (SoftHSMv2)=^C_SignInit$' \
      '    C_Sign (SoftHSMv2)=^C_Sign$' \
      '    hash the message=compute_digest\(' \
      '    key lookup=find_key\(' \
      '  audit: SHA-256 of the input again=sha256_of|^SHA256$' \
      '  encode the response=::encode\(hsm::protocol::Response' \
      '  uv_async_send=^uv_async_send$' \
      'blocking pool (BlockingPool::work)=BlockingPool::work\(' \
      'loop thread: uv_run=^uv_run$' \
      '  Connection::on_read (read, frame, decode, dispatch)=Connection::on_read\(' \
      '  Worker::on_message=Worker::on_message\(' \
      '    decode_request=decode_request\(' \
      '  Worker::dispatch=Worker::dispatch\(' \
      '    access policy (authorize)=authorize\(' \
      '    rate limiter=try_acquire\(' \
      '    BlockingPool::submit_call=BlockingPool::submit_call\(' \
      '  Worker::complete=Worker::complete\(' \
      '    AuditLog::record=AuditLog::record\(' \
      '    metrics=request_counter|observe_request|Histogram::Observe|Counter::Increment|Gauge::' \
      '  Connection writes=Connection::(flush|send)' \
      'audit writer thread=spdlog::details::thread_pool::worker_loop_' \
      'malloc + free (everything)=^(malloc|free|cfree|realloc)$'
    echo
    /usr/bin/python3 "$summary" "$out/callgrind.client" --per 'Client::sign(_detailed)?\(' --calls 'malloc=^malloc$' \
      --title "client (hsmctl bench, synchronous sign), per sign" \
      'calling thread: Client::sign=Client::sign(_detailed)?\(' \
      '  encode the request=prepare_sign|encode_request' \
      '  send=Connection::send\(' \
      'reader thread: Connection::read_loop=Connection::read_loop\(' \
      '  frame parse (msgpack)=FrameReader::next\(' \
      '  decode_response=^hsm::protocol::decode_response\(' \
      'hsm::Error constructed=^hsm::Error::Error\(' \
      'malloc + free (everything)=^(malloc|free|cfree|realloc)$'
    echo
    /usr/bin/python3 "$summary" "$out/callgrind.direct" --per '^C_Sign$' --calls 'malloc=^malloc$' \
      --title "direct (hsm-bench-direct), per sign" \
      'C_SignInit (SoftHSMv2)=^C_SignInit$' 'C_Sign (SoftHSMv2)=^C_Sign$' \
      'SHA-256 (OpenSSL)=^SHA256$|EVP_Digest\(' \
      'malloc + free (everything)=^(malloc|free|cfree|realloc)$'
  } >>"$report"
else
  note "no valgrind (or --no-callgrind): skipping the instruction counts"
fi

# ---- 3. Memory: idle connections, and RSS over a long run ----------------------------------------

if ((memory_seconds > 0)); then
  note "memory: 1000 idle connections, then ${memory_seconds} s of signing (RSS sampled)"
  port=$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  agent_settings=(--metrics-listen "127.0.0.1:$port" --audit-log "$work/audit.log")
  start_agent
  {
    echo
    echo "memory (agent with default settings, metrics on; RSS = VmRSS)"
    /usr/bin/python3 "$repo/bench/memory_check.py" --agent-pid "$agent_pid" \
      --socket "$work/agent.sock" --hsmctl "$hsmctl_bin" --kid "$kid" --idle 1000 \
      --soak "$memory_seconds" 2>&1 >"$out/memory.json"  # summary to the report, JSON apart
  } >>"$report" 2>&1
  stop_agent
fi
cat "$report"
note "written to $out"
