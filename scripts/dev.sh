#!/usr/bin/env bash
# Runs hsm-agent in the foreground on a local SoftHSMv2 token, for development.
# Installs packages (idempotent), builds, creates the token once under .dev/ (ignored by git),
# and prints the hsmctl lines to try. Ctrl-C stops the agent cleanly.
#
#   scripts/dev.sh [extra hsm-agent flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

scripts/install-deps.sh
cmake -S . -B build/dev -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHSM_BUILD_TESTS=OFF >/dev/null
cmake --build build/dev -j"${HSM_JOBS:-2}" --target hsm-agent hsmctl

dev="$root/.dev"
mkdir -p "$dev/tokens"
chmod 0700 "$dev"
export SOFTHSM2_CONF="$dev/softhsm2.conf"
if [[ ! -f "$SOFTHSM2_CONF" ]]; then
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
    "$dev/tokens" >"$SOFTHSM2_CONF"
fi
if [[ ! -f "$dev/pin" ]]; then
  (umask 077; od -An -N8 -tx8 /dev/urandom | tr -d ' \n' >"$dev/pin")
fi
if ! softhsm2-util --show-slots 2>/dev/null | grep -q "Label:.*hsm-dev"; then
  # softhsm2-util takes PINs only as arguments; this is a throwaway development token.
  softhsm2-util --init-token --free --label hsm-dev --so-pin "$(cat "$dev/pin")" \
    --pin "$(cat "$dev/pin")" >/dev/null
  echo "dev.sh: created SoftHSMv2 token 'hsm-dev' in $dev/tokens"
fi

socket="$dev/agent.sock"
cat <<TXT

hsm-agent is starting on $socket (metrics: http://127.0.0.1:9464/metrics).
In another shell, try:

  export HSM_AGENT_SOCKET=$socket
  build/dev/client/hsmctl health
  build/dev/client/hsmctl gen demo-key --alg ES256
  build/dev/client/hsmctl sign demo-key --data 'hello'
  build/dev/client/hsmctl pubkey demo-key --format pem
  build/dev/client/hsmctl keys
  curl -s http://127.0.0.1:9464/readyz

Ctrl-C stops the agent.
TXT

exec build/dev/agent/hsm-agent \
  --module /usr/lib/softhsm/libsofthsm2.so \
  --token-label hsm-dev \
  --pin-file "$dev/pin" \
  --socket "$socket" \
  --metrics-listen 127.0.0.1:9464 \
  --audit-log "$dev/audit.log" \
  "$@"
