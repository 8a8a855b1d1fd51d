#!/usr/bin/env bash
# Generates the Prometheus Operator copies of deploy/prometheus/alerts.yaml (the one source):
#   deploy/k8s/prometheusrule.yaml       a PrometheusRule with the same groups under spec
#   helm/hsm-sidecar/files/alerts.yaml   a verbatim copy the chart reads with .Files.Get
#                                        (Helm cannot read files outside the chart)
# Run it after every change to alerts.yaml.
#   gen-prometheusrule.sh           write both files
#   gen-prometheusrule.sh --check   exit 1 (and show the diff) when either is out of date
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
src="$root/deploy/prometheus/alerts.yaml"
rule="$root/deploy/k8s/prometheusrule.yaml"
chart_copy="$root/helm/hsm-sidecar/files/alerts.yaml"

render_rule() {
  cat <<'HEADER'
# GENERATED from deploy/prometheus/alerts.yaml by deploy/k8s/gen-prometheusrule.sh: do not edit.
# The Prometheus Operator loads it when its ruleSelector matches these labels (kube-prometheus-stack
# selects `release: <its release name>` by default: adjust the label).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: hsm-agent
  labels:
    app.kubernetes.io/name: hsm-agent
    app.kubernetes.io/component: alerting
    release: prometheus
spec:
HEADER
  # From `groups:` on, indented under spec (comments and block scalars keep their shape).
  sed -n '/^groups:/,$p' "$src" | sed -e 's/^\(.\)/  \1/'
}

if ! grep -q '^groups:' "$src"; then
  echo "gen-prometheusrule: no top-level groups: in $src" >&2
  exit 1
fi

if [[ "${1:-}" == "--check" ]]; then
  status=0
  if ! diff -u "$rule" <(render_rule) >&2; then
    echo "gen-prometheusrule: $rule is out of date: run deploy/k8s/gen-prometheusrule.sh" >&2
    status=1
  fi
  if ! diff -u "$chart_copy" "$src" >&2; then
    echo "gen-prometheusrule: $chart_copy is out of date: run deploy/k8s/gen-prometheusrule.sh" >&2
    status=1
  fi
  exit $status
fi

render_rule >"$rule.tmp" && mv "$rule.tmp" "$rule"
mkdir -p "$(dirname "$chart_copy")"
cp "$src" "$chart_copy.tmp" && mv "$chart_copy.tmp" "$chart_copy"
echo "wrote $rule and $chart_copy"
