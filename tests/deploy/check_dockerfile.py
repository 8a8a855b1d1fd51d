#!/usr/bin/env python3
"""Checks deploy/docker/Dockerfile without a container engine, and check_runtime_libs.sh.

- stages: build (BUILD_IMAGE, debian:bookworm) running the project's CMake build and install,
  runtime (RUNTIME_IMAGE, debian:bookworm-slim) with one apt-get install line, non-root USER
  65532, exec-form ENTRYPOINT ["/usr/bin/hsm-agent"], no HEALTHCHECK, dev adding softhsm2,
  rootfs running deploy/docker/collect-rootfs.sh, and minimal (FROM scratch, the last stage, so
  the default target) with only that file system, no RUN, USER 65532 and the same entrypoint;
- every base image comes from a build argument (so a digest pins it: the argument takes
  name:tag@sha256:...), none is written into a FROM line;
- OCI labels source, version and licenses on runtime and minimal; VERSION is the project's
  version (CMakeLists.txt) and the chart's appVersion;
- the runtime package for each -dev package of the build stage is installed in the runtime
  stage: the runtime package is the one the -dev package depends on at exactly its own version
  (dpkg-query on this bookworm machine), so a soname change in Debian fails here;
- check_runtime_libs.sh works both ways on a staging prefix made of symlinks to installed
  Debian binaries: passes when their libraries' packages are listed, fails (naming the
  package) when one is not, fails on an empty prefix.

Usage: check_dockerfile.py   (exit 0 when every check passes)
"""
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DOCKERFILE = os.path.join(ROOT, "deploy", "docker", "Dockerfile")
CHECK_LIBS = os.path.join(HERE, "check_runtime_libs.sh")

# -dev packages whose shared libraries the binaries do not load, with the reason.
NOT_LOADED = {
    "libprometheus-cpp-push1.0": "the agent exposes /metrics (pull); it never pushes",
    "libprometheus-cpp-pull1.0": "the agent serves /metrics with libmicrohttpd, not the Exposer",
}
HEADER_ONLY = {"libmsgpack-cxx-dev", "libcli11-dev"}

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


def stages(text):
    """[(from_line, as_name, [instruction lines joined over continuations])]."""
    joined = re.sub(r"\\\n", " ", text)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            result.append((m.group(1), (m.group(2) or "").lower(), []))
        elif result:
            result[-1][2].append(line)
    return result


def global_args(text):
    """ARG NAME=DEFAULT lines before the first FROM: {name: default}."""
    args = {}
    for line in text.splitlines():
        line = line.strip()
        if re.match(r"FROM\s", line, re.I):
            break
        m = re.match(r"ARG\s+([A-Za-z_]\w*)(?:=(\S*))?", line)
        if m:
            args[m.group(1)] = m.group(2)
    return args


def labels(instructions):
    found = {}
    for ins in instructions:
        if ins.upper().startswith("LABEL"):
            for m in re.finditer(r'([\w.-]+)="([^"]*)"', ins):
                found[m.group(1)] = m.group(2)
    return found


def install_packages(instructions):
    pkgs = []
    for ins in instructions:
        if not ins.upper().startswith("RUN"):
            continue
        for m in re.finditer(r"apt-get\s+install\s+([^&;|]*)", ins):
            pkgs += [w for w in m.group(1).split() if not w.startswith("-")]
    return pkgs


def dpkg_depends(package):
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}\n${Depends}", package],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None, []
    version, _, deps = r.stdout.partition("\n")
    return version, [d.strip() for d in deps.split(",") if d.strip()]


def run_check(prefix, dockerfile):
    return subprocess.run(["bash", CHECK_LIBS, prefix, dockerfile], capture_output=True, text=True)


def main():
    with open(DOCKERFILE, encoding="utf-8") as f:
        text = f.read()
    st = {name: (image, ins) for image, name, ins in stages(text)}
    check(list(st) == ["build", "runtime", "dev", "rootfs", "minimal"],
          f"stages are build, runtime, dev, rootfs, minimal: minimal is the default target (got {list(st)})")
    build_image, build = st.get("build", ("", []))
    runtime_image, runtime = st.get("runtime", ("", []))
    dev_image, dev = st.get("dev", ("", []))
    rootfs_image, rootfs = st.get("rootfs", ("", []))
    minimal_image, minimal = st.get("minimal", ("", []))
    args = global_args(text)
    check(build_image == "${BUILD_IMAGE}" and args.get("BUILD_IMAGE") == "debian:bookworm",
          "build stage is FROM ${BUILD_IMAGE} (default debian:bookworm)")
    check(runtime_image == "${RUNTIME_IMAGE}" and args.get("RUNTIME_IMAGE") == "debian:bookworm-slim",
          "runtime stage is FROM ${RUNTIME_IMAGE} (default debian:bookworm-slim)")
    check(dev_image == "runtime" and rootfs_image == "runtime", "dev and rootfs stages are FROM runtime")
    check(minimal_image == "scratch", "minimal stage is FROM scratch")
    # A pinned reference, as the documentation gives it, is what the argument carries.
    reference = re.compile(r"^[a-z0-9./-]+(:[\w.-]+)?@sha256:[0-9a-f]{64}$")
    pinned = "debian:bookworm-slim@sha256:" + "0" * 64
    check(all(re.match(r"\$\{\w+\}$", image) or image in st or image == "scratch"
              for image, _, _ in stages(text)) and reference.match(pinned),
          "every base image is a build argument (so a digest can pin it), none is hard-wired")
    readme = open(os.path.join(ROOT, "deploy", "docker", "README.md"), encoding="utf-8").read()
    check(re.search(r"--build-arg RUNTIME_IMAGE=debian:bookworm-slim@sha256:", readme) is not None,
          "deploy/docker/README.md shows pinning RUNTIME_IMAGE by digest")

    project = re.search(r"project\([^)]*VERSION\s+([\d.]+)", open(os.path.join(ROOT, "CMakeLists.txt")).read())
    chart = open(os.path.join(ROOT, "helm", "hsm-sidecar", "Chart.yaml")).read()
    app_version = re.search(r'^appVersion:\s*"?([^"\s]+)', chart, re.M)
    check(project and app_version and args.get("VERSION") == project.group(1) == app_version.group(1),
          f"ARG VERSION ({args.get('VERSION')}) is the project's version and the chart's appVersion")
    for name, ins in (("runtime", runtime), ("minimal", minimal)):
        found = labels(ins)
        want = {"org.opencontainers.image.source": "${SOURCE}", "org.opencontainers.image.version": "${VERSION}",
                "org.opencontainers.image.licenses": "${LICENSES}"}
        check(all(found.get(k) == v for k, v in want.items()),
              f"{name} stage has the OCI labels source, version, licenses (got {sorted(found)})")
        declared = {w.split("=")[0] for i in ins if i.upper().startswith("ARG") for w in i.split()[1:]}
        check({"SOURCE", "VERSION", "LICENSES"} <= declared, f"{name} stage declares the label arguments")
    check(all(args.get(a) for a in ("SOURCE", "LICENSES")), "SOURCE and LICENSES have defaults")

    rootfs_run = " ".join(i for i in rootfs if i.upper().startswith("RUN"))
    check("collect-rootfs.sh /rootfs /usr/bin/hsm-agent /usr/bin/hsmctl" in rootfs_run,
          "rootfs stage runs collect-rootfs.sh on /usr/bin/hsm-agent and /usr/bin/hsmctl")
    check(not any(i.upper().startswith("RUN") for i in minimal), "minimal stage runs nothing (it has no shell)")
    copies = [i for i in minimal if i.upper().startswith("COPY")]
    check(copies and copies[0].split()[1:] == ["--from=rootfs", "/rootfs/", "/"]
          and all("--from=rootfs" in c for c in copies), "minimal stage is the rootfs stage's /rootfs alone")
    m_users = [i.split(None, 1)[1] for i in minimal if i.upper().startswith("USER")]
    check(m_users == ["65532:65532"], f"minimal stage runs as USER 65532:65532 (got {m_users})")
    m_entry = [i.split(None, 1)[1] for i in minimal if i.upper().startswith("ENTRYPOINT")]
    check(m_entry and json.loads(m_entry[0]) == ["/usr/bin/hsm-agent"],
          'minimal stage: ENTRYPOINT ["/usr/bin/hsm-agent"] in exec form')
    check("HSM_AGENT_METRICS_LISTEN=0.0.0.0:9464" in " ".join(minimal) and "HSM_AGENT_METRICS_LISTEN=0.0.0.0:9464" in " ".join(runtime),
          "runtime and minimal listen for metrics on 0.0.0.0:9464")

    build_run = " ".join(i for i in build if i.upper().startswith("RUN"))
    for piece in ("cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DHSM_BUILD_TESTS=OFF -DHSM_BUILD_BENCH=OFF",
                  "cmake --build build", "cmake --install build --prefix /opt/hsm"):
        check(piece in build_run, f"build stage runs `{piece}`")

    runtime_pkgs = install_packages(runtime)
    runtime_installs = [i for i in runtime if "apt-get install" in i]
    check(len(runtime_installs) == 1, "runtime stage has exactly one apt-get install line")
    check("--no-install-recommends" in " ".join(runtime_installs), "runtime install has --no-install-recommends")
    check(not [p for p in runtime_pkgs if p.endswith("-dev")], "runtime stage installs no -dev package")
    check("softhsm2" not in runtime_pkgs, "runtime stage has no SoftHSMv2")
    copies = [i for i in runtime if i.upper().startswith("COPY")]
    check(any("--from=build" in c and "/opt/hsm/bin/hsm-agent" in c and "/opt/hsm/bin/hsmctl" in c
              and c.rstrip().endswith("/usr/bin/") for c in copies),
          "runtime stage copies hsm-agent and hsmctl from the build stage to /usr/bin/")
    users = [i.split(None, 1)[1] for i in runtime if i.upper().startswith("USER")]
    check(users and users[-1].split(":")[0] == "65532", f"runtime stage ends as USER 65532 (got {users})")
    entry = [i.split(None, 1)[1] for i in runtime if i.upper().startswith("ENTRYPOINT")]
    try:
        entry_ok = len(entry) == 1 and json.loads(entry[0]) == ["/usr/bin/hsm-agent"]
    except json.JSONDecodeError:
        entry_ok = False
    check(entry_ok, 'ENTRYPOINT ["/usr/bin/hsm-agent"] in exec form')
    check(not re.search(r"^\s*HEALTHCHECK", text, re.M | re.I), "no HEALTHCHECK (Kubernetes probes instead)")
    check(not re.search(r"^\s*(SHELL|CMD)\b", text, re.M | re.I), "no SHELL or CMD instruction")
    dev_users = [i.split(None, 1)[1] for i in dev if i.upper().startswith("USER")]
    check("softhsm2" in install_packages(dev), "dev stage installs softhsm2")
    check(dev_users and dev_users[-1].split(":")[0] == "65532", "dev stage ends as USER 65532")

    ignore_path = DOCKERFILE + ".dockerignore"
    ignored = set()
    if os.path.exists(ignore_path):
        with open(ignore_path, encoding="utf-8") as f:
            ignored = {l.strip() for l in f if l.strip() and not l.startswith("#")}
    check({".git", "build-*", "tests/deploy/.tools"} <= ignored,
          "Dockerfile.dockerignore keeps .git, build trees and the test tool cache out of the context")

    # -dev package -> its runtime package(s): those it depends on at exactly its own version.
    build_pkgs = install_packages(build)
    dev_pkgs = [p for p in build_pkgs if p.endswith("-dev")]
    for dev_pkg in dev_pkgs:
        version, deps = dpkg_depends(dev_pkg)
        if version is None:
            check(False, f"{dev_pkg} is installed here (to read its dependencies)")
            continue
        exact = [d.split()[0] for d in deps if re.search(r"\(=\s*" + re.escape(version) + r"\)", d)]
        exact = [d for d in exact if not d.endswith("-dev")]
        if dev_pkg in HEADER_ONLY:
            check(not exact, f"{dev_pkg} is header-only (no runtime package)")
            continue
        needed = [d for d in exact if d not in NOT_LOADED]
        missing = [d for d in needed if d not in runtime_pkgs]
        check(needed and not missing, f"{dev_pkg} -> {needed} installed in the runtime stage"
              + (f" (missing: {missing})" if missing else ""))

    # check_runtime_libs.sh, both ways, on a prefix of symlinks to Debian binaries.
    with tempfile.TemporaryDirectory() as tmp:
        good = os.path.join(tmp, "good")
        os.makedirs(os.path.join(good, "bin"))
        os.symlink("/usr/bin/softhsm2-util", os.path.join(good, "bin", "softhsm2-util"))
        with open(os.path.join(good, "bin", "wrapper.sh"), "w") as f:
            f.write("#!/bin/sh\n")  # not ELF: ignored
        r = run_check(good, DOCKERFILE)
        check(r.returncode == 0 and "ok   bin/softhsm2-util" in r.stdout,
              "check_runtime_libs.sh passes softhsm2-util (libssl3 is listed)", r.stdout + r.stderr)

        no_ssl = os.path.join(tmp, "Dockerfile.no-libssl3")
        with open(no_ssl, "w") as f:
            f.write(re.sub(r" libssl3\b", "", text))
        r = run_check(good, no_ssl)
        check(r.returncode != 0 and "package libssl3, which the runtime stage does not install" in r.stdout,
              "check_runtime_libs.sh fails softhsm2-util when libssl3 is not listed", r.stdout + r.stderr)

        bad = os.path.join(tmp, "bad")
        os.makedirs(os.path.join(bad, "bin"))
        os.symlink("/usr/bin/pkcs11-tool", os.path.join(bad, "bin", "pkcs11-tool"))
        r = run_check(bad, DOCKERFILE)
        check(r.returncode != 0 and "package opensc-pkcs11" in r.stdout,
              "check_runtime_libs.sh fails pkcs11-tool (opensc-pkcs11 not listed)", r.stdout + r.stderr)

        empty = os.path.join(tmp, "empty")
        os.makedirs(empty)
        r = run_check(empty, DOCKERFILE)
        check(r.returncode != 0 and "no ELF binary" in r.stdout,
              "check_runtime_libs.sh fails on a prefix without binaries", r.stdout + r.stderr)

    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
