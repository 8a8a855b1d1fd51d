#!/usr/bin/env python3
"""Asserts the pod of every workload in rendered manifests that runs hsm-agent.

  check_pod.py FILE.yaml [--sidecar native|classic] [--policy] [--pin-secret NAME]
               [--expect=ARG]...     (e.g. --expect=--read-only: the agent has that argument)

For each Deployment/StatefulSet/DaemonSet/Job/Pod whose pod has a container named hsm-agent:
- restricted Pod Security Standard: pod or every container runAsNonRoot, no uid 0, seccomp
  RuntimeDefault, every container (init ones too) readOnlyRootFilesystem, no privilege escalation,
  capabilities drop ALL and add none, not privileged; no host namespaces, no hostPath volume;
- probes: startup and liveness httpGet /healthz, readiness /readyz, all on the port named
  metrics, which is the --metrics-listen port;
- sidecar placement: native = an init container with restartPolicy Always; classic = a regular
  container without restartPolicy;
- socket: the --socket directory is an emptyDir with medium Memory, mounted at that directory
  by the agent and by every other regular container (the apps);
- PIN: --pin-file lies in a Secret volume mounted read-only by the agent only (and a SoftHSM
  init container), no container has HSM_AGENT_PIN or a Secret-backed variable, no argument
  carries a PIN;
- policy (--policy): --policy lies in a ConfigMap volume mounted by the agent;
- every volumeMount names a volume of the pod.
Prints one line per check and "N passed, M failed"; exits 1 when any failed.
"""
import argparse
import posixpath
import sys

import yaml

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "Pod"}


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


def pod_spec(doc):
    if doc.get("kind") == "Pod":
        return doc.get("spec", {})
    if doc.get("kind") == "Job":
        return doc["spec"]["template"]["spec"]
    return doc.get("spec", {}).get("template", {}).get("spec", {})


def arg_value(args, flag):
    """Values of --flag=value or --flag value."""
    values = []
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            values.append(a.split("=", 1)[1])
        elif a == flag and i + 1 < len(args):
            values.append(args[i + 1])
    return values


def mount_for(container, path):
    """The volumeMount of container under which path lies (longest mountPath), or None."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                best = m
    return best


def check_pod(c, name, spec, opts):
    init = spec.get("initContainers") or []
    regular = spec.get("containers") or []
    everything = init + regular
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    psc = spec.get("securityContext") or {}

    agents = [x for x in everything if x["name"] == "hsm-agent"]
    c.check(len(agents) == 1, f"{name}: exactly one hsm-agent container")
    agent = agents[0]
    args = list(agent.get("args") or []) + list(agent.get("command") or [])

    # --- restricted Pod Security Standard -------------------------------------------------
    c.check(not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")),
            f"{name}: no host namespaces")
    c.check(not any("hostPath" in v for v in volumes.values()), f"{name}: no hostPath volume")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    for x in everything:
        sc = x.get("securityContext") or {}
        who = f"{name}/{x['name']}"
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        c.check(non_root and uid != 0, f"{who}: runAsNonRoot and not uid 0")
        c.check(sc.get("readOnlyRootFilesystem") is True, f"{who}: readOnlyRootFilesystem")
        c.check(sc.get("allowPrivilegeEscalation") is False, f"{who}: allowPrivilegeEscalation false")
        caps = sc.get("capabilities") or {}
        c.check("ALL" in (caps.get("drop") or []) and not caps.get("add"),
                f"{who}: capabilities drop ALL, add none")
        c.check(not sc.get("privileged"), f"{who}: not privileged")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        c.check(seccomp == "RuntimeDefault", f"{who}: seccompProfile RuntimeDefault")
        for m in x.get("volumeMounts") or []:
            c.check(m["name"] in volumes, f"{who}: volumeMount {m['name']} names a pod volume")

    # --- sidecar placement --------------------------------------------------------------
    if opts.sidecar == "native":
        c.check(agent in init and agent.get("restartPolicy") == "Always",
                f"{name}: hsm-agent is a native sidecar (init container, restartPolicy Always)")
    elif opts.sidecar == "classic":
        c.check(agent in regular and "restartPolicy" not in agent,
                f"{name}: hsm-agent is an ordinary container")

    # --- probes ---------------------------------------------------------------------------
    ports = {p.get("name"): p.get("containerPort") for p in agent.get("ports") or []}
    listen = arg_value(args, "--metrics-listen")
    c.check(len(listen) == 1 and "metrics" in ports and listen[0].rsplit(":", 1)[-1] == str(ports["metrics"]),
            f"{name}: port 'metrics' is the --metrics-listen port ({listen})")
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = (agent.get(probe) or {}).get("httpGet") or {}
        c.check(get.get("path") == path and get.get("port") in ("metrics", ports.get("metrics")),
                f"{name}: {probe} httpGet {path} on the metrics port")

    # --- socket ---------------------------------------------------------------------------
    sockets = arg_value(args, "--socket")
    socket = sockets[0] if sockets else "/run/hsm-agent/agent.sock"
    sock_dir = posixpath.dirname(socket)
    m = mount_for(agent, socket)
    c.check(m is not None and m["mountPath"].rstrip("/") == sock_dir and not m.get("readOnly"),
            f"{name}: the agent mounts the socket directory {sock_dir} writable")
    vol = volumes.get(m["name"]) if m else None
    c.check(vol is not None and (vol.get("emptyDir") or {}).get("medium") == "Memory",
            f"{name}: the socket volume is an emptyDir with medium Memory")
    apps = [x for x in regular if x is not agent]
    c.check(len(apps) >= 1, f"{name}: at least one app container next to the agent")
    for app in apps:
        am = mount_for(app, socket)
        c.check(am is not None and m is not None and am["name"] == m["name"]
                and am["mountPath"].rstrip("/") == sock_dir,
                f"{name}/{app['name']}: mounts the same socket volume at {sock_dir}")

    # --- PIN ------------------------------------------------------------------------------
    pin_files = arg_value(args, "--pin-file")
    c.check(len(pin_files) == 1, f"{name}: --pin-file given once")
    pm = mount_for(agent, pin_files[0]) if pin_files else None
    pvol = volumes.get(pm["name"]) if pm else None
    secret = (pvol or {}).get("secret") or {}
    c.check(bool(secret.get("secretName")) and pm.get("readOnly") is True,
            f"{name}: --pin-file lies in a Secret volume mounted read-only")
    if opts.pin_secret:
        c.check(secret.get("secretName") == opts.pin_secret, f"{name}: PIN Secret is {opts.pin_secret}")
    if pm:
        others = [x["name"] for x in everything if x is not agent and x["name"] != "init-softhsm-token"
                  and any(v["name"] == pm["name"] for v in x.get("volumeMounts") or [])]
        c.check(not others, f"{name}: only the agent mounts the PIN Secret (others: {others})")
    env_pin = [f"{x['name']}:{e['name']}" for x in everything for e in x.get("env") or []
               if e["name"] == "HSM_AGENT_PIN" or "secretKeyRef" in (e.get("valueFrom") or {})]
    c.check(not env_pin, f"{name}: no PIN in environment variables ({env_pin})")
    c.check(not any(a.startswith("--pin=") or a == "--pin" for a in args), f"{name}: no PIN in the agent's arguments")

    # --- policy ---------------------------------------------------------------------------
    policies = arg_value(args, "--policy")
    if opts.policy:
        pol = mount_for(agent, policies[0]) if policies else None
        pvol = volumes.get(pol["name"]) if pol else None
        c.check(pvol is not None and "configMap" in pvol, f"{name}: --policy lies in a ConfigMap volume")
    else:
        c.check(not policies, f"{name}: no --policy")

    for expected in opts.expect or []:
        c.check(expected in args, f"{name}: argument {expected}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--sidecar", choices=["native", "classic"])
    ap.add_argument("--policy", action="store_true")
    ap.add_argument("--pin-secret")
    ap.add_argument("--expect", action="append", metavar="ARG",
                    help="an argument the agent must have; give it as --expect=ARG")
    opts = ap.parse_args()
    c = Checker()
    with open(opts.file, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    pods = 0
    for doc in docs:
        if doc.get("kind") not in WORKLOADS:
            continue
        spec = pod_spec(doc)
        if not any(x["name"] == "hsm-agent" for x in (spec.get("initContainers") or []) + (spec.get("containers") or [])):
            continue
        pods += 1
        check_pod(c, f"{doc['kind']}/{doc['metadata']['name']}", spec, opts)
    c.check(pods >= 1, f"{opts.file}: at least one pod runs hsm-agent")
    print(f"{c.passed} passed, {c.failed} failed")
    return 0 if c.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
