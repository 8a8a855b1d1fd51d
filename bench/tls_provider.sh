#!/usr/bin/env bash
# bench/tls_provider.sh: TLS handshakes per second of `openssl s_server` whose key is an
# hsm-agent key through hsm-provider (-key hsm:<kid>), against the same server with a key of the
# same type in a PEM file (the server signs in-process). docs/performance.md, "TLS handshakes
# through hsm-provider".
#
# On a throwaway SoftHSMv2 token it starts hsm-agent, generates an ES256 and a PS256 key, makes a
# self-signed certificate for each (signed through the provider) and a PEM key of the same type
# with its own certificate, then for each of the four servers runs `openssl s_time -new` (a full
# handshake per connection, TLS 1.3, one client process) for --duration seconds, --repeat times,
# and keeps each server's best run. s_server handles one connection at a time, so each handshake
# pays one agent round trip plus the token's signature in sequence: this is the latency cost per
# handshake, not the agent's throughput (bench/run.sh measures that).
#
#   bench/tls_provider.sh [--build-dir DIR] [--duration S] [--repeat N] [--keep]
#
# Needs hsm-agent, hsmctl and hsm_provider built in DIR (default: build/bench, else build/test).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly repo
# shellcheck source=bench/softhsm_token.sh
source "$repo/bench/softhsm_token.sh"

build_dir='' duration=5 repeat=1 keep=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --build-dir) build_dir=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "tls_provider.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
if [[ -z $build_dir ]]; then
  for candidate in "$repo/build/bench" "$repo/build/test"; do
    [[ -x $candidate/agent/hsm-agent ]] && { build_dir=$candidate; break; }
  done
fi
[[ -n $build_dir ]] || { echo "tls_provider.sh: no build directory (--build-dir)" >&2; exit 2; }
build_dir=$(realpath "$build_dir")  # openssl.cnf's module path must be absolute
agent=$build_dir/agent/hsm-agent
hsmctl=$build_dir/client/hsmctl
module=$build_dir/client/provider/hsm.so
for f in "$agent" "$hsmctl" "$module"; do
  [[ -e $f ]] || { echo "tls_provider.sh: $f missing (cmake --build $build_dir --target hsm-agent hsmctl hsm_provider)" >&2; exit 2; }
done

work=$(mktemp -d /tmp/hsm-tls-bench-XXXXXX)
agent_pid='' server_pid=''
cleanup() {
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  [[ -n $agent_pid ]] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
  if [[ $keep == 1 ]]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

make_throwaway_token "$work" tls-bench
socket=$work/agent.sock
"$agent" --module /usr/lib/softhsm/libsofthsm2.so --token-label tls-bench \
  --pin-file "$work/user.pin" --socket "$socket" >"$work/audit.log" 2>"$work/agent.err" &
agent_pid=$!
for _ in $(seq 100); do [[ -S $socket ]] && break; sleep 0.1; done
[[ -S $socket ]] || { cat "$work/agent.err" >&2; exit 1; }
export HSM_AGENT_SOCKET=$socket

cat >"$work/openssl.cnf" <<EOF
openssl_conf = openssl_init
[openssl_init]
providers = provider_sect
[provider_sect]
default = default_sect
hsm = hsm_sect
[default_sect]
activate = 1
[hsm_sect]
module = $module
socket = $socket
activate = 1
EOF
hsm_openssl() { OPENSSL_CONF=$work/openssl.cnf openssl "$@"; }
stock_openssl() { OPENSSL_CONF=/dev/null openssl "$@"; }

declare -A sigopts=([ES256]="" [PS256]="-sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:digest")
declare -A genkey=([ES256]="-algorithm EC -pkeyopt ec_paramgen_curve:P-256"
                   [PS256]="-algorithm RSA -pkeyopt rsa_keygen_bits:2048")
for alg in ES256 PS256; do
  "$hsmctl" gen "tls-$alg" --alg "$alg" >/dev/null
  # shellcheck disable=SC2086
  hsm_openssl req -new -x509 -key "hsm:tls-$alg" ${sigopts[$alg]} -subj /CN=localhost -days 1 \
    -out "$work/hsm-$alg.crt"
  # shellcheck disable=SC2086
  stock_openssl genpkey ${genkey[$alg]} -out "$work/pem-$alg.key" 2>/dev/null
  # shellcheck disable=SC2086
  stock_openssl req -new -x509 -key "$work/pem-$alg.key" ${sigopts[$alg]} -subj /CN=localhost \
    -days 1 -out "$work/pem-$alg.crt"
done

# One measurement: handshakes per second against a server started with `$@`.
handshakes_per_second() {
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$@" -accept "127.0.0.1:$port" -www -quiet >"$work/server.out" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
  done
  local out
  out=$(stock_openssl s_time -connect "127.0.0.1:$port" -new -time "$duration" 2>&1)
  kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null || true
  server_pid=
  # "N connections in T real seconds, ..." -> N / T
  awk '/connections in [0-9.]+ real seconds/ { printf "%.1f\n", $1 / $4; found = 1 }
       END { if (!found) print "0" }' <<<"$out"
}

declare -A best
for ((round = 1; round <= repeat; round++)); do
  for alg in ES256 PS256; do
    for mode in provider pem; do
      if [[ $mode == provider ]]; then
        rate=$(handshakes_per_second hsm_openssl s_server -key "hsm:tls-$alg" -cert "$work/hsm-$alg.crt")
      else
        rate=$(handshakes_per_second stock_openssl s_server -key "$work/pem-$alg.key" -cert "$work/pem-$alg.crt")
      fi
      key=$alg/$mode
      if [[ -z ${best[$key]:-} ]] || awk -v a="$rate" -v b="${best[$key]}" 'BEGIN { exit !(a > b) }'; then
        best[$key]=$rate
      fi
    done
  done
done

signs=$(grep -c '"method":"sign"' "$work/audit.log" || true)
printf '\nTLS 1.3 handshakes/s, openssl s_server (one connection at a time) and s_time -new, %ss runs, best of %s\n' "$duration" "$repeat"
printf '%-6s | %12s | %12s | %s\n' key "hsm:<kid>" "PEM file" "provider/PEM"
for alg in ES256 PS256; do
  p=${best[$alg/provider]} f=${best[$alg/pem]}
  printf '%-6s | %12s | %12s | %s\n' "$alg" "$p" "$f" "$(awk -v p="$p" -v f="$f" 'BEGIN { printf (f > 0 ? "%.2f" : "-"), p / f }')"
done
echo "agent audit log: $signs sign requests (one per handshake with the provider key, plus the certificates)"
echo "machine: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
