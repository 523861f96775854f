"""DNS: dnsperf against the agent's DNS and dnsmasq serving the same names, as ratios.

Both servers are pinned to one core (taskset), dnsperf to another. Cluster names: the agent
answers them from manifests, dnsmasq from ``--host-record``. Cached upstream names: both
forward to a third dnsmasq (``--address=/example.test/...``) and answer from their caches after
a warm-up. Each round loads both servers at the same time, each with its own dnsperf, both
dnsperf on the client core: the two servers share one core and whatever else the shared machine
runs on it, so the noise hits both alike (round ratios within a few percent even when the
servers get a fifth of the core). ``--interleaved`` runs them one after the other instead, the
order swapped every round (ABBA), which swings 0.5-2x per round on a busy machine. The median
per-round ratio is printed, of queries per second and of queries per CPU-second of the server
(fair when dnsperf rather than the server is the limit). Each run also shows how
busy the server's and dnsperf's cores were (CPU-seconds per second): a server well below 100%
while dnsperf is near 100% means dnsperf, not the server, was the limit.

    .venv/bin/python -m bench.dns [--seconds 3] [--rounds 8] [--names 100] [--outstanding 100]
                                  [--clients 1] [--interleaved] [--json]

``0x20``: the cluster names again, each spelled in many random mixes of upper and lower case
(``--casings`` per name, more spellings than the agent's answer memo holds), as resolvers that
randomise the case of their questions against spoofing (RFC 4343, "DNS 0x20") send them.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from bench.report import add_json_flag, emit, print_peers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZONE = "cluster.local"


def free_port() -> int:
    """A port free for UDP and TCP, below the ephemeral range (busy with others' connections)."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                u.bind(("127.0.0.1", port))
                t.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def cpus() -> tuple[str, str]:
    """(server core, client core): distinct when there are two or more."""
    avail = sorted(os.sched_getaffinity(0))
    return str(avail[-1]), str(avail[0])


def manifests(directory: str, n: int) -> list[str]:
    """``n`` ClusterIP services in namespace ``bench``; returns their (name, ip) lines."""
    docs, names = [], []
    for i in range(n):
        ip = f"10.96.{i // 250}.{i % 250 + 1}"
        docs.append(f"""apiVersion: v1
kind: Service
metadata: {{name: svc{i}, namespace: bench}}
spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}
""")
        names.append(f"svc{i}.bench.svc.{ZONE},{ip}")
    with open(os.path.join(directory, "services.yaml"), "w", encoding="utf-8") as f:
        f.write("---\n".join(docs))
    return names


def wait_answer(port: int, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), name, "+short", "+tries=1",
                              "+time=1"], capture_output=True, text=True)
        if out.stdout.strip():
            return
        time.sleep(0.2)
    raise RuntimeError(f"no answer for {name} on port {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


PEERS = {"dnsmasq": "one process pinned to the server core; --cache-size=10000; cluster names "
                    "as --host-record, others forwarded (--server) and cached; --local-ttl=30"}


@dataclass
class Run:
    qps: float
    per_cpu: float  # queries per CPU-second of the server
    server_busy: float  # the server's CPU-seconds per second of the run
    client_busy: float  # dnsperf's


def dnsperf(port: int, queries: str, seconds: float, core: str, pid: int | None = None,
            outstanding: int = 100, clients: int = 1) -> Run:
    """One dnsperf run against ``port``; ``pid`` is the server whose CPU time is measured."""
    return dnsperf_together([(port, pid)], queries, seconds, core, outstanding, clients)[0]


def dnsperf_together(targets: list[tuple[int, int | None]], queries: str, seconds: float,
                     core: str, outstanding: int = 100, clients: int = 1) -> list[Run]:
    """One dnsperf per (port, server pid), all at the same time, all on ``core``."""
    cpu_before = [cpu_seconds(pid) if pid else 0.0 for _, pid in targets]
    started = time.monotonic()
    procs = []
    for port, _ in targets:
        out = tempfile.TemporaryFile(mode="w+")
        procs.append((subprocess.Popen(
            ["taskset", "-c", core, "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d",
             queries, "-l", str(seconds), "-q", str(outstanding), "-c", str(clients)],
            stdout=out, stderr=subprocess.STDOUT, text=True), out))
    runs = []
    for (port, pid), before, (proc, out) in zip(targets, cpu_before, procs, strict=True):
        _, status, usage = os.wait4(proc.pid, 0)  # taskset execs dnsperf: its own rusage
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        cpu = cpu_seconds(pid) - before if pid else 0.0
        out.seek(0)
        runs.append(parse_run(out.read(), port, queries, cpu, wall,
                              (usage.ru_utime + usage.ru_stime) / wall))
        out.close()
    return runs


def parse_run(stdout: str, port: int, queries: str, cpu: float, wall: float,
              client_busy: float) -> Run:
    found = re.search(r"Queries per second:\s+([\d.]+)", stdout)
    completed = re.search(r"Queries completed:\s+(\d+)", stdout)
    if not found:
        raise RuntimeError(f"dnsperf said:\n{stdout}")
    lost = re.search(r"Queries lost:\s+(\d+)", stdout)
    if float(found.group(1)) == 0:
        print(stdout, file=sys.stderr)
    if lost and int(lost.group(1)):
        print(f"  (port {port} {os.path.basename(queries)}: {lost.group(1)} queries lost)",
              file=sys.stderr)
    per_cpu = int(completed.group(1)) / cpu if completed and cpu > 0 else 0.0
    return Run(float(found.group(1)), per_cpu, cpu / wall, client_busy)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--names", type=int, default=100)
    parser.add_argument("--outstanding", type=int, default=100,
                        help="dnsperf -q: queries in flight (more than a socket buffer of a "
                        "peer holds only measures its drops)")
    parser.add_argument("--clients", type=int, default=1, help="dnsperf -c")
    parser.add_argument("--interleaved", action="store_true",
                        help="load the servers one after the other (ABBA) instead of at the "
                        "same time")
    parser.add_argument("--casings", type=int, default=200,
                        help="random spellings per cluster name in the 0x20 queries")
    add_json_flag(parser)
    args = parser.parse_args()
    for tool in ("dnsperf", "dnsmasq", "dig", "taskset"):
        if shutil.which(tool) is None:
            print(f"needs {tool}", file=sys.stderr)
            return 2
    server_core, client_core = cpus()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp:
        try:
            return run(args, tmp, procs, server_core, client_core)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()


def run(args: argparse.Namespace, tmp: str, procs: list[subprocess.Popen[bytes]],
        server_core: str, client_core: str) -> int:
    up_port, peer_port, our_port = free_port(), free_port(), free_port()
    print(f"ports: upstream {up_port}, dnsmasq {peer_port}, edgemesh {our_port}")
    mdir = os.path.join(tmp, "manifests")
    os.mkdir(mdir)
    records = manifests(mdir, args.names)
    dnsmasq = ["dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
               "--listen-address=127.0.0.1", "--user=root", "--pid-file="]
    procs.append(subprocess.Popen([*dnsmasq, f"--port={up_port}", "--local-ttl=3600",
                                   "--address=/example.test/192.0.2.1"],
                                  stderr=subprocess.DEVNULL))
    peer = subprocess.Popen(
        ["taskset", "-c", server_core, *dnsmasq, f"--port={peer_port}", "--cache-size=10000",
         f"--server=127.0.0.1#{up_port}", "--local-ttl=30",
         *(f"--host-record={r}" for r in records)], stderr=subprocess.DEVNULL)
    procs.append(peer)
    peer_pid = peer.pid  # taskset execs the server: same pid
    config = os.path.join(tmp, "agent.yaml")
    with open(config, "w", encoding="utf-8") as f:
        f.write("modules:\n  edgeProxy: {enable: false}\n  edgeTunnel: {enable: false}\n"
                f"  edgeDNS:\n    cacheDNS: {{upstreamServers: ['127.0.0.1:{up_port}']}}\n"
                "commonConfig: {adminAddress: ''}\n")
    ours_proc = subprocess.Popen(
        ["taskset", "-c", server_core, sys.executable, "-m", "edgemesh", "agent", "--config",
         config, "--manifests", mdir, "--dns-listen", f"127.0.0.1:{our_port}", "--no-iptables",
         "--state-dir", os.path.join(tmp, "state"), "-v", "0"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stderr=subprocess.DEVNULL)
    procs.append(ours_proc)
    our_pid = ours_proc.pid
    cluster_q = os.path.join(tmp, "cluster.txt")
    upstream_q = os.path.join(tmp, "upstream.txt")
    with open(cluster_q, "w", encoding="utf-8") as f:
        f.writelines(f"{r.split(',')[0]} A\n" for r in records)
    with open(upstream_q, "w", encoding="utf-8") as f:
        f.writelines(f"host{i}.example.test A\n" for i in range(args.names))
    mixed_q = os.path.join(tmp, "0x20.txt")
    rng = random.Random(20)
    with open(mixed_q, "w", encoding="utf-8") as f:
        for _ in range(args.casings):
            f.writelines("".join(c.upper() if rng.random() < 0.5 else c
                                 for c in r.split(",")[0]) + " A\n" for r in records)
    print_peers(PEERS)
    for port in (peer_port, our_port):
        wait_answer(port, f"svc0.bench.svc.{ZONE}")
        dnsperf(port, upstream_q, 1, client_core)  # warm both caches
    print(f"servers on core {server_core}, dnsperf on core {client_core}; "
          f"{args.names} names, {args.seconds:g} s per run, {args.rounds} rounds")
    kinds = (("cluster", cluster_q), ("0x20", mixed_q), ("upstream", upstream_q))
    ratios: dict[str, list[float]] = {kind: [] for kind, _ in kinds}
    cpu_ratios: dict[str, list[float]] = {kind: [] for kind, _ in kinds}
    qps: dict[str, list[float]] = {f"{who} {kind}": [] for kind, _ in kinds
                                   for who in ("edgemesh", "dnsmasq")}
    print("per run: qps (queries per server CPU-second; server busy, dnsperf busy)")
    for r in range(args.rounds):
        for kind, queries in kinds:
            runs: dict[str, Run] = {}
            order = [("edgemesh", our_port, our_pid), ("dnsmasq", peer_port, peer_pid)]
            if r % 2:
                order.reverse()
            if not args.interleaved:
                both = dnsperf_together([(port, pid) for _, port, pid in order], queries,
                                        args.seconds, client_core, args.outstanding,
                                        args.clients)
                runs = {who: run for (who, _, _), run in zip(order, both, strict=True)}
            for who, port, pid in order if args.interleaved else ():
                runs[who] = dnsperf(port, queries, args.seconds, client_core, pid,
                                    args.outstanding, args.clients)
            ours, theirs = runs["edgemesh"], runs["dnsmasq"]
            ratios[kind].append(ours.qps / theirs.qps)
            qps[f"edgemesh {kind}"].append(ours.qps)
            qps[f"dnsmasq {kind}"].append(theirs.qps)
            cpu_ratios[kind].append(ours.per_cpu / theirs.per_cpu if theirs.per_cpu else 0.0)
            print(f"round {r + 1} {kind:<8} " + "   ".join(
                f"{who} {run.qps:7.0f} ({run.per_cpu:6.0f}/cpu-s; {run.server_busy:4.0%}, "
                f"{run.client_busy:4.0%})" for who, run in runs.items())
                + f"   ratio {ratios[kind][-1]:.2f}")
    for kind in ratios:
        q = sorted(ratios[kind])
        print(f"{kind} names: edgemesh/dnsmasq = {statistics.median(q):.2f}x qps "
              f"(rounds {q[0]:.2f}..{q[-1]:.2f}), "
              f"{statistics.median(cpu_ratios[kind]):.2f}x queries per CPU-second (medians)")
    if args.json:
        emit("dns", {f"{kind} qps edgemesh/dnsmasq": statistics.median(ratios[kind])
                     for kind in ratios}
             | {f"{kind} per CPU-s edgemesh/dnsmasq": statistics.median(cpu_ratios[kind])
                for kind in ratios},
             {k: statistics.median(v) for k, v in qps.items()}, PEERS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
