"""UDP proxy: the agent's UDP service proxy vs nginx (stream, udp, 1 worker) vs direct, as ratios.

dnsperf sends DNS queries to a dnsmasq backend that answers from a hosts file of its own
(``--addn-hosts``, no upstream: nothing leaves loopback) through three paths: the agent with
``--no-iptables`` (its UDP listener for a service whose endpoint is the dnsmasq, found in
``/debug/proxy``), nginx ``stream { server { listen ... udp; proxy_pass ...;
proxy_responses 1; } }`` with one worker, and dnsmasq directly. Both proxies are pinned to one
core with taskset, dnsperf to the other (dnsmasq is not pinned). Runs are interleaved for
``--rounds`` rounds (the proxies' order alternating), once from one client address (one UDP
session) and once from ``--clients`` addresses (``dnsperf -c``: one session each); the medians
of the per-round ratios are printed, and each proxy's CPU microseconds per query (steadier than
rates on a shared machine). Last, the agent's RSS before, with ``--sessions`` UDP sessions open,
after they expired (``udpIdleTimeout`` is ``--idle`` seconds here), and after a second cycle.

    .venv/bin/python -m bench.udp [--seconds 3] [--rounds 3] [--clients 50] [--sessions 2000]
                                  [--json]
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench.listeners import agent_ports
from bench.processes import Children, cpu_seconds
from bench.report import add_json_flag, config_lines, emit, print_peers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
DOMAIN = "bench.test"
NAMES = 100

SERVICE = """apiVersion: v1
kind: Service
metadata: {{name: dns, namespace: bench}}
spec:
  clusterIP: 10.96.0.53
  ports: [{{name: dns, port: 53, targetPort: {target}, protocol: UDP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dns-1
  namespace: bench
  labels: {{kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{{name: dns, port: {target}, protocol: UDP}}]
endpoints: [{{addresses: ["127.0.0.1"]}}]
"""

NGINX = """load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx.err;
events {{ worker_connections 20000; }}
stream {{
  server {{
    listen 127.0.0.1:{port} udp;
    proxy_pass 127.0.0.1:{target};
    proxy_responses 1;
    proxy_timeout 10s;
  }}
}}
"""


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpus() -> tuple[str, str]:
    avail = sorted(os.sched_getaffinity(0))
    return str(avail[-1]), str(avail[0])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def query(name: str, qid: int) -> bytes:
    """A DNS query for ``name`` A, recursion desired."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"


def answers(port: int, timeout: float = 30.0) -> None:
    """Wait until a query sent to ``port`` is answered (exit the bench if it never is)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        while time.monotonic() < deadline:
            s.sendto(query(f"host0.{DOMAIN}", 7), (HOST, port))
            try:
                if s.recv(4096)[:2] == b"\0\7":
                    return
            except OSError:
                time.sleep(0.1)
    raise SystemExit(f"no DNS answer via {HOST}:{port}")


class Bench(Children):
    def __init__(self, args: argparse.Namespace, tmp: str) -> None:
        self.args = args
        self.tmp = tmp
        server_cpu, self.client_cpu = cpus()
        super().__init__(server_cpu)
        self.dns, self.nginx_port = free_port(), free_port()
        self.queries = os.path.join(tmp, "queries.txt")

    def start(self) -> dict[str, int]:
        """The dnsmasq backend, nginx and the agent; returns path name -> UDP port."""
        hosts = os.path.join(self.tmp, "hosts")
        with open(hosts, "w", encoding="ascii") as f:
            f.writelines(f"10.1.{i // 250}.{i % 250 + 1} host{i}.{DOMAIN}\n"
                         for i in range(NAMES))
        with open(self.queries, "w", encoding="ascii") as f:
            f.writelines(f"host{i}.{DOMAIN} A\n" for i in range(NAMES))
        self.spawn(["dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}",
                    f"--local=/{DOMAIN}/", "--bind-interfaces", f"--listen-address={HOST}",
                    f"--port={self.dns}", "--user=root", "--pid-file=", "--local-ttl=60"],
                   pin=False)
        conf = os.path.join(self.tmp, "nginx.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(NGINX.format(dir=self.tmp, port=self.nginx_port, target=self.dns))
        self.nginx = self.spawn(["nginx", "-c", conf, "-e", os.path.join(self.tmp, "nginx.err")])
        mdir = os.path.join(self.tmp, "m")
        os.mkdir(mdir)
        with open(os.path.join(mdir, "svc.yaml"), "w", encoding="utf-8") as f:
            f.write(SERVICE.format(target=self.dns))
        cfg = os.path.join(self.tmp, "agent.yaml")
        with open(cfg, "w", encoding="utf-8") as f:
            f.write("modules: {edgeDNS: {enable: false}, edgeTunnel: {enable: false}, "
                    f"edgeProxy: {{udpIdleTimeout: {self.args.idle}, "
                    f"maxUDPSessions: {self.args.sessions + 1000}}}}}\n"
                    f"commonConfig: {{stateDir: {self.tmp}/state}}\n")
        self.admin = f"{HOST}:{free_port(socket.SOCK_STREAM)}"
        self.agent_log = open(os.path.join(self.tmp, "agent.log"), "wb")
        self.agent = self.spawn([sys.executable, "-m", "edgemesh", "agent", "--config", cfg,
                                 "--manifests", mdir, "--no-iptables", "--admin", self.admin,
                                 "--node-name", "bench", "-v", "1"], stderr=self.agent_log,
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        ports = {"direct": self.dns, "nginx": self.nginx_port,
                 "agent": agent_ports(self.admin, self.agent_log.name, count=1)["dns"]}
        for port in ports.values():
            answers(port)
        return ports

    def nginx_worker(self) -> int:
        """The pid of nginx's one worker (the master only supervises)."""
        with open(f"/proc/{self.nginx.pid}/task/{self.nginx.pid}/children",
                  encoding="ascii") as f:
            return int(f.read().split()[0])

    def dnsperf(self, port: int, clients: int) -> tuple[float, int, int]:
        """Queries per second, queries completed and lost in one run via ``port``."""
        out = subprocess.run(
            ["taskset", "-c", self.client_cpu, "dnsperf", "-s", HOST, "-p", str(port),
             "-d", self.queries, "-l", str(self.args.seconds), "-q", str(self.args.outstanding),
             "-c", str(clients), "-t", "1"],
            capture_output=True, text=True, timeout=self.args.seconds + 60).stdout
        qps = re.search(r"Queries per second:\s+([\d.]+)", out)
        done = re.search(r"Queries completed:\s+(\d+)", out)
        lost = re.search(r"Queries lost:\s+(\d+)", out)
        if not qps or not done or float(qps.group(1)) == 0:
            raise SystemExit(f"dnsperf via port {port} made no queries:\n{out}")
        return float(qps.group(1)), int(done.group(1)), int(lost.group(1)) if lost else 0

    def sessions_gauge(self) -> int:
        """The agent's open UDP sessions (its edgemesh_proxy_udp_sessions gauge)."""
        with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                   if line.startswith("edgemesh_proxy_udp_sessions{"))

    def open_sessions(self, port: int) -> tuple[int, int, int]:
        """``--sessions`` client sockets each send one query via ``port`` and read its reply;
        returns (replies received, agent RSS KiB, sessions it counts) with them all open."""
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                 for _ in range(self.args.sessions)]
        try:
            poller = select.poll()  # select() stops at descriptor 1024
            by_fd = {s.fileno(): s for s in socks}
            for i, s in enumerate(socks):
                s.setblocking(False)
                poller.register(s.fileno(), select.POLLIN)
                s.sendto(query(f"host{i % NAMES}.{DOMAIN}", i & 0xFFFF), (HOST, port))
                if i % 20 == 19:
                    time.sleep(0.01)  # paced: the listener's socket buffer never overflows
            got, deadline = 0, time.monotonic() + 2
            while got < len(socks) and time.monotonic() < deadline:
                for fd, _ in poller.poll(100):
                    by_fd[fd].recv(4096)
                    poller.unregister(fd)
                    got += 1
            return got, rss_kib(self.agent.pid), self.sessions_gauge()
        finally:
            for s in socks:
                s.close()

    def session_memory(self, port: int) -> list[tuple[str, int, int]]:
        """(stage, agent RSS KiB, sessions) before, open, expired, open again, expired again."""
        pid = self.agent.pid
        time.sleep(self.args.idle * 1.25 + 1)  # the dnsperf runs' sessions expire first
        rows = [("before", rss_kib(pid), self.sessions_gauge())]
        for cycle in ("", " again"):
            got, rss, sessions = self.open_sessions(port)
            rows.append((f"open{cycle} ({got} replies)", rss, sessions))
            time.sleep(self.args.idle * 1.25 + 1)  # expired and swept
            rows.append((f"expired{cycle}", rss_kib(pid), self.sessions_gauge()))
        return rows


def ratio(d: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(d[a], d[b], strict=True))


def run(bench: Bench, ports: dict[str, int]) -> None:
    args = bench.args
    names = ("direct", "nginx", "agent")
    pids = {"direct": None, "nginx": bench.nginx_worker(), "agent": bench.agent.pid}
    print(f"proxies on core {bench.server_cpu}, dnsperf on core {bench.client_cpu}; "
          f"{args.seconds} s per run, {args.rounds} rounds, -q {args.outstanding}")
    peers = {"nginx": config_lines(NGINX, ("worker_processes", "listen", "proxy_"))}
    print_peers(peers)
    ratios: dict[str, float] = {}
    medians: dict[str, float] = {}
    for clients in (1, args.clients):
        qps: dict[str, list[float]] = {n: [] for n in names}
        cpu_q: dict[str, list[float]] = {n: [] for n in names}
        lost = dict.fromkeys(names, 0)
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else ("direct", "agent", "nginx")
            for name in order:
                c0 = cpu_seconds(pids[name])
                rate, done, lost_now = bench.dnsperf(ports[name], clients)
                qps[name].append(rate)
                cpu_q[name].append((cpu_seconds(pids[name]) - c0) * 1e6 / done)
                lost[name] += lost_now
        print(f"dnsperf -c {clients}: queries/s per round | proxy CPU us per query (median) "
              "| queries lost")
        for name in names:
            cpu = f"{statistics.median(cpu_q[name]):6.1f}" if pids[name] else "     -"
            print(f"  {name:<8} {' '.join(f'{v:8.0f}' for v in qps[name])} | {cpu} | "
                  f"{lost[name]}")
        print(f"  ratios (median of per-round): agent/nginx {ratio(qps, 'agent', 'nginx'):.2f}"
              f"   agent/direct {ratio(qps, 'agent', 'direct'):.2f}"
              f"   nginx/direct {ratio(qps, 'nginx', 'direct'):.2f}"
              f"   CPU per query nginx/agent {ratio(cpu_q, 'nginx', 'agent'):.2f}"
              " (> 1: the agent spends less)")
        ratios[f"qps agent/nginx -c{clients}"] = ratio(qps, "agent", "nginx")
        ratios[f"CPU per query nginx/agent -c{clients}"] = ratio(cpu_q, "nginx", "agent")
        medians |= {f"{n} qps -c{clients}": statistics.median(qps[n]) for n in names}
    if args.sessions:
        print(f"agent RSS with {args.sessions} UDP sessions (udpIdleTimeout {args.idle} s)")
        rows = bench.session_memory(ports["agent"])
        for stage, rss, sessions in rows:
            print(f"  {stage:<28} {rss:7d} KiB  {sessions:5d} sessions")
        per = (rows[1][1] - rows[0][1]) / max(rows[1][2] - rows[0][2], 1)
        print(f"  per session {per:.2f} KiB")
        medians["agent KiB per session"] = per
    if args.json:
        emit("udp", ratios, medians, peers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=50, help="dnsperf -c for the many-"
                        "clients runs: client sockets, one UDP session each")
    parser.add_argument("--outstanding", type=int, default=100, help="dnsperf -q")
    parser.add_argument("--sessions", type=int, default=2000,
                        help="sessions opened for the memory rows (0: skip them)")
    parser.add_argument("--idle", type=float, default=5.0,
                        help="the agent's udpIdleTimeout, seconds")
    add_json_flag(parser)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket per session
    if hard < args.sessions + 1000:
        raise SystemExit(f"--sessions {args.sessions} needs an open-files limit of "
                         f"{args.sessions + 1000}; the hard limit is {hard}")
    with tempfile.TemporaryDirectory(prefix="bench-udp-") as tmp:
        bench = Bench(args, tmp)
        try:
            run(bench, bench.start())
        finally:
            bench.stop()


if __name__ == "__main__":
    main()
