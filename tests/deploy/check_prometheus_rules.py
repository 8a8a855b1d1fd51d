#!/usr/bin/env python3
"""Checks deploy/prometheus/alerts.yaml and its unit tests.

- `promtool check rules` and `promtool test rules` pass;
- each alert has a severity label, summary/description annotations and a runbook_url whose
  anchor is a heading of deploy/prometheus/README.md;
- the unit tests really exercise every alert both ways: with the alert's expression replaced by
  one that never fires the tests must fail (so some test expects it firing), and with one that
  always fires they must fail too (so some test expects it silent).

Usage: check_prometheus_rules.py   (exit 0 when every check passes)
"""
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PROM = os.path.join(ROOT, "deploy", "prometheus")
RULES = os.path.join(PROM, "alerts.yaml")
TESTS = os.path.join(PROM, "alerts.test.yaml")
README = os.path.join(PROM, "README.md")

EXPECTED_ALERTS = ["HsmAgentDown", "HsmDown", "HsmAgentHighErrorRatio", "HsmAgentSignLatencyHigh",
                   "HsmAgentSessionsExhausted", "HsmAgentLoginFailures", "HsmAgentAuditLogFailing"]

passed = failed = 0


def check(ok, what, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {what}")
    else:
        failed += 1
        print(f"FAIL {what}")
        if detail:
            print(detail)
    return ok


def promtool(*args):
    return subprocess.run(["promtool", *args], capture_output=True, text=True)


def github_anchor(heading):
    a = heading.strip().lower()
    a = re.sub(r"[^\w\- ]", "", a)
    return a.replace(" ", "-")


def main():
    r = promtool("check", "rules", RULES)
    check(r.returncode == 0, "promtool check rules alerts.yaml", r.stdout + r.stderr)
    r = promtool("test", "rules", TESTS)
    check(r.returncode == 0, "promtool test rules alerts.test.yaml", r.stdout + r.stderr)

    with open(RULES, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    groups = doc.get("groups", [])
    check([g.get("name") for g in groups] == ["hsm-agent"], "one rule group named hsm-agent")
    rules = [r for g in groups for r in g.get("rules", [])]
    names = [r.get("alert") for r in rules]
    check(sorted(names) == sorted(EXPECTED_ALERTS), f"alerts are {EXPECTED_ALERTS} (got {names})")

    with open(README, encoding="utf-8") as f:
        anchors = {github_anchor(m) for m in re.findall(r"^#+\s+(.*)$", f.read(), re.M)}
    for rule in rules:
        name = rule.get("alert")
        labels, ann = rule.get("labels", {}), rule.get("annotations", {})
        check(labels.get("severity") in ("critical", "warning", "info"), f"{name}: severity label")
        check(bool(ann.get("summary")) and bool(ann.get("description")),
              f"{name}: summary and description annotations")
        url = ann.get("runbook_url", "")
        check(url.startswith("deploy/prometheus/README.md#") and url.split("#", 1)[1] in anchors,
              f"{name}: runbook_url {url!r} names a heading of deploy/prometheus/README.md")

    # Mutations: each alert never firing, then always firing; the unit tests must notice.
    with open(TESTS, encoding="utf-8") as f:
        tests = yaml.safe_load(f)
    work = tempfile.mkdtemp(prefix="hsm-rules-")
    try:
        for i, rule in enumerate(rules):
            for label, expr in (("never fires", "vector(1) == 2"), ("always fires", "vector(1)")):
                mutated = copy.deepcopy(doc)
                flat = [r for g in mutated["groups"] for r in g["rules"]]
                flat[i]["expr"] = expr
                flat[i].pop("for", None)
                rules_path = os.path.join(work, "alerts.yaml")
                with open(rules_path, "w", encoding="utf-8") as f:
                    yaml.safe_dump(mutated, f)
                t = dict(tests, rule_files=[rules_path])
                tests_path = os.path.join(work, "alerts.test.yaml")
                with open(tests_path, "w", encoding="utf-8") as f:
                    yaml.safe_dump(t, f)
                res = promtool("test", "rules", tests_path)
                check(res.returncode != 0,
                      f"{rule['alert']}: the unit tests fail when the alert {label}")
    finally:
        shutil.rmtree(work)

    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
