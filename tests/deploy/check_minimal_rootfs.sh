#!/usr/bin/env bash
# check_minimal_rootfs.sh PREFIX
#
# The image's `minimal` stage (FROM scratch) without a container engine: runs
# deploy/docker/collect-rootfs.sh on PREFIX/bin/hsm-agent and PREFIX/bin/hsmctl (a staging
# install of the build, as the rootfs stage does on the runtime stage's /usr/bin), then checks
# the result and runs the binaries in a chroot of it:
#   - no shell (sh, bash, dash, busybox) and no package manager (apt, apt-get, dpkg);
#   - nothing but the two binaries, the libraries they load, the loader, copyright files,
#     passwd/group; /tmp 1777, /run/hsm-agent owned by 65532;
#   - a shell does not start in it; hsm-agent --version and hsmctl --help run in it as 65532;
#   - the agent serves: with SoftHSMv2's module copied in, hsm-agent runs in the chroot as 65532
#     on a token, /healthz answers, and hsmctl health (in the chroot too) reaches it by the socket.
# Needs root (chroot, unshare), util-linux, softhsm2, python3. Last line "N passed, M failed"; exit 0 when all passed.
# shellcheck disable=SC2317  # functions run through `check` and the trap look unreachable to shellcheck
# shellcheck disable=SC2016  # bash -c '...' bodies expand in the child shell, on purpose
set -uo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 PREFIX" >&2
  exit 2
fi
prefix="$(cd "$1" && pwd)"
here="$(cd "$(dirname "$0")" && pwd)"
collect="$here/../../deploy/docker/collect-rootfs.sh"

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   $1"; }
fail() { failed=$((failed + 1)); echo "FAIL $1"; }
check() {  # check WHAT COMMAND...
  local what="$1" out
  shift
  if out="$("$@" 2>&1)"; then ok "$what"; else fail "$what"; echo "$out" | tail -10; fi
}
finish() {
  echo "$passed passed, $failed failed"
  [[ $failed -eq 0 ]]
  exit $?
}

if [[ "$(id -u)" -ne 0 ]]; then
  fail "check_minimal_rootfs.sh needs root (chroot, chown)"
  finish
fi

chroot="$(command -v chroot)" || { fail "chroot is installed (coreutils)"; finish; }
work="$(mktemp -d /tmp/hsm-minimal-rootfs.XXXXXX)"
agent_pid=""
cleanup() {
  [[ -n "$agent_pid" ]] && kill "$agent_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
chmod 0755 "$work"
root="$work/rootfs"

if ! sh "$collect" "$root" "$prefix/bin/hsm-agent" "$prefix/bin/hsmctl" >"$work/collect.out" 2>&1; then
  fail "collect-rootfs.sh on $prefix"
  cat "$work/collect.out"
  finish
fi
ok "collect-rootfs.sh on $prefix ($(wc -l <"$work/collect.out") libraries)"

# ---- what is in it ------------------------------------------------------------------------------
forbidden="$(find "$root" \( -name sh -o -name bash -o -name dash -o -name busybox -o -name 'apt*' \
  -o -name 'dpkg*' \) -printf '%P\n')"
if [[ -z "$forbidden" ]]; then ok "no shell and no package manager"; else fail "found: $forbidden"; fi

# Every regular file is a binary, a library ldd listed, the loader, a copyright file or passwd/group.
mapfile -t libs < <(awk '{print substr($1, 2)}' "$work/collect.out")
unexpected=()
while IFS= read -r f; do
  case "$f" in
    usr/bin/hsm-agent | usr/bin/hsmctl | etc/passwd | etc/group | usr/share/doc/*/copyright) ;;
    *) [[ " ${libs[*]} " == *" $f "* ]] || unexpected+=("$f") ;;
  esac
done < <(find "$root" -type f -printf '%P\n')
if [[ ${#unexpected[@]} -eq 0 ]]; then ok "only the binaries, their libraries, copyright files and passwd/group"
else fail "unexpected files: ${unexpected[*]}"; fi
check "no symlink (every library is a regular file at the path the loader resolves)" \
  bash -c '[[ -z "$(find "$1" -type l)" ]]' _ "$root"
check "/tmp is 1777" bash -c '[[ "$(stat -c %a "$1/tmp")" == 1777 ]]' _ "$root"
check "/run/hsm-agent belongs to 65532:65532" bash -c '[[ "$(stat -c %u:%g "$1/run/hsm-agent")" == 65532:65532 ]]' _ "$root"
check "65532 is nonroot in /etc/passwd" grep -qx 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' "$root/etc/passwd"
for pkg in libc6 libssl3 libmicrohttpd12 libgnutls30; do
  check "the copyright file of $pkg travels with its library" test -s "$root/usr/share/doc/$pkg/copyright"
done

# ---- it runs ------------------------------------------------------------------------------------
if chroot "$root" /bin/sh -c true >/dev/null 2>&1; then fail "a shell starts in the rootfs"; else ok "no shell starts in the rootfs"; fi
in_root() { env -i "$chroot" --userspec=65532:65532 "$root" "$@"; }
check "hsm-agent --version runs in the rootfs as 65532" in_root /usr/bin/hsm-agent --version
check "hsmctl --help runs in the rootfs as 65532" in_root /usr/bin/hsmctl --help

# The agent on a SoftHSMv2 token, inside the rootfs. SoftHSMv2's module loads only libraries the
# agent loads too (libcrypto, libstdc++): copy just the module in.
module=/usr/lib/softhsm/libsofthsm2.so
if [[ ! -f "$module" ]] || ! command -v softhsm2-util >/dev/null; then
  fail "softhsm2 is installed (Debian package softhsm2)"
  finish
fi
mkdir -p "$root/opt/pkcs11" "$root/var/lib/tokens" "$root/run/secrets"
cp "$module" "$root/opt/pkcs11/"
printf 'directories.tokendir = /var/lib/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' >"$root/etc/softhsm2.conf"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$root/var/lib/tokens" >"$work/softhsm2.conf"
pin="rootfs-$RANDOM$RANDOM"
printf '%s' "$pin" >"$root/run/secrets/pin"
check "token initialised" env SOFTHSM2_CONF="$work/softhsm2.conf" \
  softhsm2-util --init-token --free --label minimal --so-pin "$pin" --pin "$pin"
chown -R 65532:65532 "$root/var/lib/tokens" "$root/run/secrets"
chmod 0400 "$root/run/secrets/pin"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# A container runtime mounts /proc (the agent sets the socket's mode through /proc/self/fd):
# so does this, in a private mount namespace that ends with the agent.
mkdir -p "$root/proc"
env -i SOFTHSM2_CONF=/etc/softhsm2.conf unshare -m --propagation private -- \
  "$BASH" -c 'mount -t proc proc "$1/proc" && exec "$2" --userspec=65532:65532 "$1" "${@:3}"' _ "$root" "$chroot" \
  /usr/bin/hsm-agent --module=/opt/pkcs11/libsofthsm2.so --token-label=minimal --pin-file=/run/secrets/pin \
  --socket=/run/hsm-agent/agent.sock --metrics-listen="127.0.0.1:$port" --log-format=text \
  >"$work/agent.out" 2>&1 &
agent_pid=$!
healthy=0
for _ in $(seq 1 300); do  # polls every 0.1 s, up to 30 s on a loaded machine
  if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "http://127.0.0.1:$port/healthz" 2>/dev/null && [[ -S "$root/run/hsm-agent/agent.sock" ]]; then
    healthy=1
    break
  fi
  kill -0 "$agent_pid" 2>/dev/null || break
  sleep 0.1
done
if [[ $healthy -eq 1 ]]; then ok "hsm-agent serves /healthz from the rootfs (libmicrohttpd, gnutls, the module)"
else fail "hsm-agent serves /healthz from the rootfs"; tail -20 "$work/agent.out"; fi
check "hsmctl health, in the rootfs, reaches the agent by its socket" \
  env -i HSM_AGENT_SOCKET=/run/hsm-agent/agent.sock "$chroot" --userspec=65532:65532 "$root" /usr/bin/hsmctl health
kill -TERM "$agent_pid" 2>/dev/null
wait "$agent_pid" 2>/dev/null
status=$?
agent_pid=""
check "hsm-agent stops cleanly on SIGTERM (exit $status)" test "$status" -eq 0
check "the PIN is in no log line" bash -c '! grep -qF -- "$1" "$2"' _ "$pin" "$work/agent.out"
finish
