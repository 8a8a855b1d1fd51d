#!/usr/bin/python3
"""Issue 7's memory targets against a running hsm-agent (bench/profile.sh --memory-seconds).

  memory_check.py --agent-pid P --socket S --hsmctl HSMCTL --kid K [--idle 1000] [--soak 150]

1. RSS with N idle connections: opens N connections (after one `caps` request on each, so the
   agent has accepted and set up every one of them), reads the agent's VmRSS, closes them.
2. Heap growth under load: runs `hsmctl bench` (2 connections x depth 8) for --soak seconds while
   sampling the agent's VmRSS every --interval seconds; prints the samples and the growth from
   the end of the first fifth (after warm-up: allocator arenas, session and key caches filled) to
   the end. Steady state shows as a flat line; a per-request leak as a slope.
Prints one JSON document on stdout (and a readable summary on stderr).
"""
import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time

import msgpack  # python3-msgpack (scripts/install-deps.sh)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def caps_request(msgid):
    """[0, msgid, "capabilities", [{}]] (protocol/README.md)."""
    return msgpack.packb([0, msgid, "capabilities", [{}]])


def idle_connections(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.idle + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.idle + 64), hard))
    before = rss_kib(args.agent_pid)
    sockets = []
    try:
        for i in range(args.idle):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(args.socket)
            s.sendall(caps_request(i + 1))
            sockets.append(s)
        for s in sockets:  # every connection answered: the agent holds all of them
            s.settimeout(30)
            if not s.recv(65536):
                raise RuntimeError("the agent closed an idle connection")
        time.sleep(1)
        during = rss_kib(args.agent_pid)
    finally:
        for s in sockets:
            s.close()
    return {"connections": len(sockets), "rss_before_mib": round(before / 1024, 1),
            "rss_with_idle_mib": round(during / 1024, 1),
            "per_connection_kib": round((during - before) / max(1, len(sockets)), 1)}


def soak(args):
    command = [args.hsmctl, "--socket", args.socket, "--json", "bench", args.kid,
               "--connections", "2", "--depth", "8", "--duration", str(args.soak), "--warmup", "0"]
    bench = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    start = time.monotonic()
    samples = []
    while bench.poll() is None:
        samples.append((round(time.monotonic() - start, 1), rss_kib(args.agent_pid)))
        time.sleep(args.interval)
    report = json.loads(bench.stdout.read())
    settled = samples[max(0, len(samples) // 5 - 1)][1]
    last = samples[-1][1]
    ops = report["ops"]
    return {"seconds": args.soak, "signatures": ops, "errors": report["errors"],
            "rss_samples_kib": samples, "rss_after_warmup_mib": round(settled / 1024, 1),
            "rss_end_mib": round(last / 1024, 1), "rss_peak_mib": round(max(s[1] for s in samples) / 1024, 1),
            "growth_after_warmup_kib": last - settled,
            "growth_bytes_per_signature": round((last - settled) * 1024 / max(1, ops * 4 // 5), 3)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--agent-pid", type=int, required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--hsmctl", required=True)
    parser.add_argument("--kid", required=True)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--soak", type=int, default=150)
    parser.add_argument("--interval", type=float, default=5)
    args = parser.parse_args()
    result = {"idle": idle_connections(args)}
    print(f"idle: {result['idle']}", file=sys.stderr)
    if args.soak > 0:
        result["soak"] = soak(args)
        s = result["soak"]
        print(f"soak: {s['signatures']} signatures in {s['seconds']} s, RSS after warm-up "
              f"{s['rss_after_warmup_mib']} MiB, at the end {s['rss_end_mib']} MiB "
              f"(peak {s['rss_peak_mib']}), {s['growth_bytes_per_signature']} bytes/signature",
              file=sys.stderr)
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
