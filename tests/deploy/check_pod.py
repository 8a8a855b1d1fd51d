#!/usr/bin/env python3
"""Asserts the pod of every workload in rendered manifests that runs hsm-agent.

  check_pod.py FILE.yaml [--sidecar native|classic] [--app-waits] [--policy] [--pin-secret NAME]
               [--expect=ARG]...     (e.g. --expect=--read-only: the agent has that argument)

For each Deployment/StatefulSet/DaemonSet/Job/Pod whose pod has a container named hsm-agent:
- the restricted Pod Security Standard (Kubernetes v1.29+, every control of the "restricted"
  and "baseline" profiles; https://kubernetes.io/docs/concepts/security/pod-security-standards/):
  no host namespaces, no hostPath and only the allowed volume types, no hostPort, not
  privileged, no added capability but NET_BIND_SERVICE and ALL dropped, default /proc mount,
  only safe sysctls, no unconfined AppArmor or seccomp, restricted SELinux options, no Windows
  host process, runAsNonRoot and no uid 0, no privilege escalation, seccomp RuntimeDefault or
  Localhost; for every container, init and ephemeral ones too; beyond the standard:
  readOnlyRootFilesystem everywhere and seccomp RuntimeDefault for the agent;
- probes: startup and liveness httpGet /healthz, readiness /readyz, all on the port named
  metrics, which is the --metrics-listen port;
- sidecar placement: native = an init container with restartPolicy Always; classic = a regular
  container without restartPolicy; --app-waits: every app container's command waits for the
  socket file (`[ -S <socket> ]`) before anything else, as an app beside a classic sidecar must;
- socket: the --socket directory is an emptyDir with medium Memory, mounted at that directory
  by the agent and by every other regular container (the apps); only the agent mounts it
  writable (the premise of --shared-socket-dir, which the agent then has);
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


def pod_metadata(doc):
    if doc.get("kind") == "Pod":
        return doc.get("metadata", {})
    return doc.get("spec", {}).get("template", {}).get("metadata", {})


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


# The restricted profile's allowed volume types and the baseline profile's safe sysctls.
PSS_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                    "persistentVolumeClaim", "projected", "secret"}
PSS_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                    "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                    "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                    "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
PSS_SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t",
                     "container_engine_t"}


def restricted_pod_security(c, name, meta, spec):
    """Every control of the baseline and restricted Pod Security Standards, as the admission
    controller checks them on a pod (containers, initContainers and ephemeralContainers)."""
    everything = ((spec.get("initContainers") or []) + (spec.get("containers") or [])
                  + (spec.get("ephemeralContainers") or []))
    psc = spec.get("securityContext") or {}
    volumes = spec.get("volumes") or []
    annotations = (meta or {}).get("annotations") or {}

    # baseline
    c.check(not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")),
            f"{name}: PSS host namespaces: none")
    c.check(not any("hostPath" in v for v in volumes), f"{name}: PSS hostPath volumes: none")
    c.check(not (psc.get("windowsOptions") or {}).get("hostProcess"), f"{name}: PSS no Windows host process")
    sysctls = [s.get("name") for s in psc.get("sysctls") or []]
    c.check(all(s in PSS_SAFE_SYSCTLS for s in sysctls), f"{name}: PSS only safe sysctls ({sysctls})")
    apparmor = {k: v for k, v in annotations.items() if k.startswith("container.apparmor.security.beta.kubernetes.io/")}
    c.check(all(v == "runtime/default" or v.startswith("localhost/") for v in apparmor.values()),
            f"{name}: PSS AppArmor annotations not unconfined")
    pod_apparmor = (psc.get("appArmorProfile") or {}).get("type")
    c.check(pod_apparmor in (None, "RuntimeDefault", "Localhost"), f"{name}: PSS pod AppArmor profile")
    pod_selinux = psc.get("seLinuxOptions") or {}
    c.check(pod_selinux.get("type") in PSS_SELINUX_TYPES and not pod_selinux.get("user")
            and not pod_selinux.get("role"), f"{name}: PSS pod SELinux options restricted")
    # restricted
    types = sorted({k for v in volumes for k in v if k != "name"})
    c.check(all(t in PSS_VOLUME_TYPES for t in types), f"{name}: PSS volume types allowed ({types})")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    c.check(pod_seccomp in (None, "RuntimeDefault", "Localhost"), f"{name}: PSS pod seccomp not Unconfined")
    c.check(psc.get("runAsUser") != 0, f"{name}: PSS pod runAsUser not 0")

    for x in everything:
        sc = x.get("securityContext") or {}
        who = f"{name}/{x['name']}"
        c.check(not sc.get("privileged"), f"{who}: PSS not privileged")
        caps = sc.get("capabilities") or {}
        c.check("ALL" in (caps.get("drop") or []), f"{who}: PSS capabilities drop ALL")
        # The standard allows adding NET_BIND_SERVICE; nothing here needs even that.
        c.check(not caps.get("add"), f"{who}: PSS capabilities add none")
        c.check(not any(p.get("hostPort") for p in x.get("ports") or []), f"{who}: PSS no hostPort")
        c.check(sc.get("procMount") in (None, "Default"), f"{who}: PSS default /proc mount")
        c.check(not (sc.get("windowsOptions") or {}).get("hostProcess"), f"{who}: PSS no Windows host process")
        selinux = sc.get("seLinuxOptions") or {}
        c.check(selinux.get("type") in PSS_SELINUX_TYPES and not selinux.get("user")
                and not selinux.get("role"), f"{who}: PSS SELinux options restricted")
        c.check((sc.get("appArmorProfile") or {}).get("type") in (None, "RuntimeDefault", "Localhost"),
                f"{who}: PSS AppArmor profile not Unconfined")
        c.check(sc.get("allowPrivilegeEscalation") is False, f"{who}: PSS allowPrivilegeEscalation false")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        c.check(non_root and uid != 0, f"{who}: PSS runAsNonRoot and not uid 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        c.check(seccomp in ("RuntimeDefault", "Localhost"), f"{who}: PSS seccompProfile RuntimeDefault or Localhost")


def check_pod(c, name, spec, opts, pod_meta=None):
    init = spec.get("initContainers") or []
    regular = spec.get("containers") or []
    everything = init + regular
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    psc = spec.get("securityContext") or {}

    agents = [x for x in everything if x["name"] == "hsm-agent"]
    c.check(len(agents) == 1, f"{name}: exactly one hsm-agent container")
    agent = agents[0]
    args = list(agent.get("args") or []) + list(agent.get("command") or [])

    # --- restricted Pod Security Standard ----------------------------------------------
    restricted_pod_security(c, name, pod_meta, spec)
    for x in everything:
        sc = x.get("securityContext") or {}
        who = f"{name}/{x['name']}"
        c.check(sc.get("readOnlyRootFilesystem") is True, f"{who}: readOnlyRootFilesystem")
        for m in x.get("volumeMounts") or []:
            c.check(m["name"] in volumes, f"{who}: volumeMount {m['name']} names a pod volume")
    agent_seccomp = ((agent.get("securityContext") or {}).get("seccompProfile")
                     or psc.get("seccompProfile") or {}).get("type")
    c.check(agent_seccomp == "RuntimeDefault", f"{name}/hsm-agent: seccompProfile RuntimeDefault")

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
    c.check("--shared-socket-dir" in args,
            f"{name}: the agent has --shared-socket-dir (the socket volume is an emptyDir, 0777)")
    if m is not None:
        writers = [x["name"] for x in everything if x is not agent
                   and any(v["name"] == m["name"] and not v.get("readOnly") for v in x.get("volumeMounts") or [])]
        c.check(not writers, f"{name}: only the agent mounts the socket volume writable (others: {writers})")
    apps = [x for x in regular if x is not agent]
    c.check(len(apps) >= 1, f"{name}: at least one app container next to the agent")
    for app in apps:
        am = mount_for(app, socket)
        c.check(am is not None and m is not None and am["name"] == m["name"]
                and am["mountPath"].rstrip("/") == sock_dir,
                f"{name}/{app['name']}: mounts the same socket volume at {sock_dir}")
        if opts.app_waits:
            script = " ".join((app.get("command") or []) + (app.get("args") or []))
            wait = f"until [ -S '{socket}' ]"
            # The wait loop comes first: before the first loop of the app's own script ends.
            c.check(wait in script and script.index(wait) < script.find("done"),
                    f"{name}/{app['name']}: waits for the socket before it starts ({wait})")

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
    c.check(not any(a.lower().lstrip("-").split("=")[0] in ("pin", "user-pin") or "HSM_AGENT_PIN" in a.upper()
                    for a in args), f"{name}: no PIN in the agent's arguments")

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
    ap.add_argument("--app-waits", action="store_true")
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
        check_pod(c, f"{doc['kind']}/{doc['metadata']['name']}", spec, opts, pod_metadata(doc))
    c.check(pods >= 1, f"{opts.file}: at least one pod runs hsm-agent")
    print(f"{c.passed} passed, {c.failed} failed")
    return 0 if c.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
