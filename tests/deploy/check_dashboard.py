#!/usr/bin/env python3
"""Checks deploy/grafana/dashboard.json.

- well-formed JSON, schemaVersion, unique panel ids, panels inside the 24-column grid and not
  overlapping;
- imports anywhere, the monitoring-mixins way: no __inputs and no hard-wired datasource uid (every
  panel, target and query variable uses the `datasource` variable, type datasource), the
  cluster, namespace, job and pod variables, and every selector filters on cluster and namespace;
  timezone utc, a fixed uid, tags;
- the panels that count errors (and the request rate) show 0, not "No data", before the first
  error: their queries are evaluated by `promtool test rules` on the series of an agent that has
  served nothing yet, and of one that has served requests without an error;
- the chart's copy (helm/hsm-sidecar/files/dashboard.json, its Grafana ConfigMap) is identical;
- every PromQL expression parses (each is handed to `promtool check rules` as a recording rule,
  after the Grafana variables are replaced) and histogram_quantile keeps `le`;
- every metric an expression names is in the catalogue of issue 5 (below), so a typo or a
  renamed metric fails here, and every catalogue metric is shown somewhere;
- the row "HSM or agent?" answers its question alone: one panel plots the sign request latency
  next to the time inside the PKCS#11 module (C_Sign) and the queue wait, and one splits the
  mean sign time into the HSM's and the agent's share (docs/metrics.md).

Usage: check_dashboard.py [DASHBOARD_JSON]   (exit 0 when every check passes)
"""
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT = os.path.join(ROOT, "deploy", "grafana", "dashboard.json")
CHART_COPY = os.path.join(ROOT, "helm", "hsm-sidecar", "files", "dashboard.json")

# Panels that must show 0 rather than "No data" on an agent that has served nothing yet; all but
# "Requests / s" must show 0 on one that has served requests without an error as well.
ZERO_PANELS = {"Requests / s", "Server error ratio", "Error ratio", "PKCS#11 errors by CKR",
               "Rejected and closed connections, protocol errors"}
# The series of one scraped agent (every label a kube-prometheus PodMonitor adds).
AGENT = 'job="hsm-agent", instance="10.0.0.7:9464", pod="shop-7f9c", namespace="signing", cluster="eu-1"'
FRESH = [("up", "1+0x20"), ("hsm_agent_build_info", "1+0x20"), ("hsm_agent_hsm_up", "1+0x20"),
         ("hsm_agent_connections_open", "0+0x20")]
SERVED = FRESH + [('hsm_agent_requests_total{%s, method="sign", code="ok"}', "0+60x20")]

# The metric catalogue of issue 5 (docs/metrics.md): name -> type.
CATALOGUE = {
    "hsm_agent_requests_total": "counter",
    "hsm_agent_request_duration_seconds": "histogram",
    "hsm_agent_requests_in_flight": "gauge",
    "hsm_agent_pkcs11_call_duration_seconds": "histogram",
    "hsm_agent_pkcs11_errors_total": "counter",
    "hsm_agent_sessions": "gauge",
    "hsm_agent_session_wait_seconds": "histogram",
    "hsm_agent_queue_wait_seconds": "histogram",
    "hsm_agent_hsm_up": "gauge",
    "hsm_agent_hsm_probe_duration_seconds": "histogram",
    "hsm_agent_logins_total": "counter",
    "hsm_agent_connections_open": "gauge",
    "hsm_agent_connections_total": "counter",
    "hsm_agent_connections_rejected_total": "counter",
    "hsm_agent_protocol_errors_total": "counter",
    "hsm_agent_connections_closed_total": "counter",
    "hsm_agent_build_info": "gauge",
}
# Not the agent's own families but allowed: Prometheus's scrape health and the standard
# process metrics issue 5 asks for (CPU, RSS, open fds, start time).
EXTRA = {"up", "process_cpu_seconds_total", "process_resident_memory_bytes",
         "process_open_fds", "process_start_time_seconds"}


def allowed_names():
    names = set(EXTRA)
    for name, kind in CATALOGUE.items():
        names.add(name)
        if kind == "histogram":
            names.update({name + "_bucket", name + "_sum", name + "_count"})
    return names


def base_name(name):
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and CATALOGUE.get(name[: -len(suffix)]) == "histogram":
            return name[: -len(suffix)]
    return name


KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "offset", "bool", "inf", "nan", "atan2"}


def metric_names(expr):
    """Metric names a PromQL expression selects (its syntax is checked by promtool)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", "", s)                # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)               # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word in KEYWORDS:
            continue
        names.add(word)
    return names


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


class Checker:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, ok, what):
        if ok:
            self.passed += 1
            print(f"ok   {what}")
        else:
            self.failed += 1
            print(f"FAIL {what}")
        return ok


def as_promql(expr, values):
    """A panel query as Prometheus sees it: Grafana's variables replaced by their values."""
    promql = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    for name, value in values.items():
        promql = promql.replace("$" + name, value)
    return promql


def check_zero_panels(c, panels):
    """ZERO_PANELS show 0 before the first error: promtool evaluates each of their queries."""
    found = {p.get("title"): p for p in panels if p.get("title") in ZERO_PANELS}
    c.check(set(found) == ZERO_PANELS, f"the panels {sorted(ZERO_PANELS)} exist")
    values = {"cluster": "eu-1", "namespace": "signing", "job": "hsm-agent", "pod": ".*", "instance": ".*"}
    tests = []
    for state, series, titles in (("an agent that has served nothing", FRESH, ZERO_PANELS),
                                  ("an agent that has served requests without an error", SERVED,
                                   ZERO_PANELS - {"Requests / s"})):
        input_series = [{"series": (name % AGENT) if "%s" in name else f"{name}{{{AGENT}}}", "values": v}
                        for name, v in series]
        tests.append({"interval": "1m", "input_series": input_series, "name": state,
                      "promql_expr_test": [{"expr": as_promql(x["expr"], values), "eval_time": "15m",
                                            "exp_samples": [{"labels": "{}", "value": 0}]}
                                           for p in found.values() if p.get("title") in titles
                                           for x in p.get("targets", [])]})
    with tempfile.TemporaryDirectory() as tmp:
        rules = os.path.join(tmp, "empty.yaml")
        with open(rules, "w") as f:
            json.dump({"groups": []}, f)
        test = os.path.join(tmp, "zero.test.yaml")
        with open(test, "w") as f:
            json.dump({"rule_files": [rules], "evaluation_interval": "1m", "tests": tests}, f)
        r = subprocess.run(["promtool", "test", "rules", test], capture_output=True, text=True)
    n = sum(len(t["promql_expr_test"]) for t in tests)
    c.check(r.returncode == 0, f"{n} queries of {sorted(found)} give 0, not no data, on an agent "
            "without errors (promtool test rules)")
    if r.returncode != 0:
        print((r.stdout + r.stderr)[-3000:])


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT
    c = Checker()
    try:
        with open(path, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        c.check(False, f"{path} is well-formed JSON: {e}")
        print(f"{c.passed} passed, {c.failed} failed")
        return 1
    c.check(True, "dashboard is well-formed JSON")
    c.check(isinstance(dash.get("schemaVersion"), int) and 36 <= dash["schemaVersion"] <= 39,
            f"schemaVersion is 36..39 (got {dash.get('schemaVersion')})")
    c.check(bool(dash.get("uid")) and bool(dash.get("title")), "dashboard has a uid and a title")

    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    c.check(ds.get("type") == "datasource" and ds.get("query") == "prometheus",
            "templating has the datasource variable (type datasource, prometheus)")
    c.check("__inputs" not in dash, "no __inputs: the data source is chosen by the variable, not at import")
    text = json.dumps(dash)
    c.check("DS_" not in text, "no ${DS_...} import placeholder anywhere")
    uids = set(re.findall(r'"uid": "([^"]*)"', json.dumps(
        {k: v for k, v in dash.items() if k not in ("uid", "annotations")})))
    c.check(uids == {"${datasource}"}, f"every datasource uid is ${{datasource}} (got {sorted(uids)})")
    names = [v.get("name") for v in dash.get("templating", {}).get("list", [])]
    c.check(names[:5] == ["datasource", "cluster", "namespace", "job", "pod"],
            f"variables datasource, cluster, namespace, job, pod in that order (got {names})")
    for name in ("cluster", "namespace", "job", "pod"):
        v = variables.get(name, {})
        c.check(v.get("type") == "query" and v.get("includeAll") and v.get("allValue") == ".*"
                and (v.get("datasource") or {}).get("uid") == "${datasource}",
                f"the {name} variable: a query on ${{datasource}} with All = .*")
    c.check(dash.get("timezone") == "utc" and dash.get("uid") == "hsm-agent" and "hsm-agent" in dash.get("tags", []),
            "timezone utc, uid hsm-agent, tag hsm-agent (monitoring-mixins defaults)")
    try:
        with open(CHART_COPY, "rb") as f, open(path, "rb") as g:
            same = f.read() == g.read()
    except OSError:
        same = False
    c.check(same, "helm/hsm-sidecar/files/dashboard.json equals the dashboard "
            "(cp deploy/grafana/dashboard.json helm/hsm-sidecar/files/)")

    panels = list(walk_panels(dash.get("panels", [])))
    ids = [p.get("id") for p in panels]
    c.check(len(ids) == len(set(ids)) and None not in ids, "panel ids are set and unique")

    grid_ok = True
    boxes = []
    for p in panels:
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in ("x", "y", "w", "h")) or g["x"] + g["w"] > 24:
            grid_ok = False
            print(f"     bad gridPos in panel {p.get('title')!r}: {g}")
            continue
        for q, other in boxes:
            if (g["x"] < q["x"] + q["w"] and q["x"] < g["x"] + g["w"]
                    and g["y"] < q["y"] + q["h"] and q["y"] < g["y"] + g["h"]):
                grid_ok = False
                print(f"     panel {p.get('title')!r} overlaps {other!r}")
        boxes.append((g, p.get("title")))
    c.check(grid_ok, "every panel lies in the 24-column grid without overlapping another")

    # Every expression: panels' targets and the query variables.
    exprs = []
    for p in panels:
        for t in p.get("targets", []):
            if "expr" in t:
                exprs.append((p.get("title"), t["expr"]))
                ds_ok = t.get("datasource", p.get("datasource", {})).get("uid") == "${datasource}"
                c.check(ds_ok, f"target {t.get('refId')} of {p.get('title')!r} uses ${{datasource}}")
    c.check(len(exprs) >= 20, f"dashboard has at least 20 queries (got {len(exprs)})")

    allowed = allowed_names()
    used = set()
    for v in variables.values():
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.match(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)", q or "")
        ok = bool(m) and m.group(1) in allowed
        c.check(ok, f"variable {v.get('name')} queries a catalogue metric: {q}")
        if m:
            used.add(base_name(m.group(1)))

    rules = []
    for i, (title, expr) in enumerate(exprs):
        promql = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
        names = metric_names(promql)
        unknown = sorted(names - allowed)
        c.check(not unknown and names, f"{title!r}: metrics {sorted(names)} are in the catalogue"
                + (f" (unknown: {unknown})" if unknown else ""))
        used.update(base_name(n) for n in names)
        if "histogram_quantile" in promql:
            bys = re.findall(r"\bby\s*\(([^)]*)\)", promql)
            ok = "_bucket" in promql and all("le" in [x.strip() for x in b.split(",")] for b in bys)
            c.check(ok, f"{title!r}: histogram_quantile over _bucket keeps le")
        stray = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql)
        c.check("$" not in stray, f"{title!r}: no Grafana variable outside a label matcher")
        selectors = re.findall(r"\{([^}]*)\}", promql)
        c.check(selectors and all('cluster=~"$cluster"' in m and 'namespace=~"$namespace"' in m
                                  for m in selectors),
                f"{title!r}: every selector filters on $cluster and $namespace")
        rules.append({"record": f"dashboard:expr_{i}", "expr": promql})

    # The "HSM or agent?" row: the panels between its row header and the next row.
    row_panels, in_row = [], False
    for p in sorted(panels, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if p.get("type") == "row":
            in_row = p.get("title", "").startswith("HSM or agent?")
            continue
        if in_row:
            row_panels.append(p)
    def panel_with(*needles):
        for p in row_panels:
            text = " ".join(t.get("expr", "") for t in p.get("targets", []))
            if all(n in text for n in needles):
                return p
        return None
    side_by_side = panel_with('hsm_agent_request_duration_seconds_bucket', 'method="sign"',
                              'hsm_agent_pkcs11_call_duration_seconds_bucket', 'function="C_Sign"',
                              'hsm_agent_queue_wait_seconds_bucket')
    c.check(side_by_side is not None, '"HSM or agent?" has a panel with sign request, C_Sign '
            'and queue wait latency side by side')
    split = panel_with('hsm_agent_request_duration_seconds_sum',
                       'hsm_agent_pkcs11_call_duration_seconds_sum')
    c.check(split is not None and split.get("fieldConfig", {}).get("defaults", {}).get(
        "custom", {}).get("stacking", {}).get("mode") == "normal",
        '"HSM or agent?" has a stacked panel splitting the mean sign time into HSM and agent')

    missing = sorted(set(CATALOGUE) - used)
    c.check(not missing, "every catalogue metric appears on the dashboard"
            + (f" (missing: {missing})" if missing else ""))

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        tmp = f.name
    try:
        r = subprocess.run(["promtool", "check", "rules", tmp], capture_output=True, text=True)
    finally:
        os.unlink(tmp)
    c.check(r.returncode == 0, f"promtool parses all {len(rules)} expressions")
    if r.returncode != 0:
        print(r.stdout + r.stderr)

    check_zero_panels(c, panels)

    print(f"{c.passed} passed, {c.failed} failed")
    return 0 if c.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
