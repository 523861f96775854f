"""TCP proxy: the agent's service proxy vs haproxy (mode tcp) and nginx stream vs direct, as ratios.

Everything runs on loopback (127.0.0.1): the agent with ``--no-iptables`` (its per-port
listeners, found in ``/debug/proxy``), haproxy and nginx ``stream`` in front of the same
backends, and the backends themselves for the direct path. The peers at their best for bulk
TCP on one core: haproxy ``nbthread 1`` with ``option splice-auto`` and ``tune.pipesize`` as
large as the agent's splice pipe (haproxy's manual advises a larger pipe for splicing
throughput, and advises against raising ``tune.bufsize``, which spliced data does not pass
through); nginx one worker, ``proxy_buffer_size 64k``. Their configuration lines are printed.
The proxies are pinned to one core with taskset, the clients
to the other (the backends are not pinned). Measured, interleaved for ``--rounds`` rounds
(the proxies' order alternating), median per-round ratios printed, and each proxy's CPU
per GB and per new connection (steadier than rates on a shared machine):

- bulk throughput: ``iperf3 -c`` (one stream) through each path;
- new connections per second: ``wrk -H "Connection: close"`` against a one-worker nginx that
  answers ``204``, so every request is a new proxied connection;
- memory: RSS of each proxy before, with ``--idle`` idle proxied connections open, after they
  are closed, and after a second open/close cycle (no growth: freed memory is reused);
  per-connection KiB.

    .venv/bin/python -m bench.proxy [--seconds 5] [--rounds 3] [--idle 5000] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from bench.listeners import agent_ports, service
from bench.processes import Children, cpu_seconds
from bench.report import add_json_flag, config_lines, emit, median_ratio, print_peers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpus() -> tuple[str, str]:
    avail = sorted(os.sched_getaffinity(0))
    return str(avail[-1]), str(avail[0])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {HOST}:{port}")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


NGINX = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx.err;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_header_timeout 600s;
  server {{ listen 127.0.0.1:{port} backlog=4096; location / {{ return 204; }} }}
}}
"""

HAPROXY = """global
  nbthread 1
  maxconn {maxconn}
  tune.pipesize 1048576
defaults
  mode tcp
  option splice-auto
  timeout connect 5s
  timeout client 600s
  timeout server 600s
listen iperf
  bind 127.0.0.1:{hp_iperf}
  server s1 127.0.0.1:{iperf}
listen http
  bind 127.0.0.1:{hp_http} backlog 4096
  server s1 127.0.0.1:{http}
"""


NGINX_STREAM = """load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
pid {dir}/stream.pid;
error_log {dir}/stream.err;
worker_rlimit_nofile {nofile};
events {{ worker_connections {maxconn}; }}
stream {{
  proxy_buffer_size 64k;
  proxy_connect_timeout 5s;
  proxy_timeout 600s;
  server {{ listen 127.0.0.1:{ng_iperf}; proxy_pass 127.0.0.1:{iperf}; }}
  server {{ listen 127.0.0.1:{ng_http} backlog=4096; proxy_pass 127.0.0.1:{http}; }}
}}
"""


def peer_config(haproxy: str, nginx: str) -> dict[str, str]:
    return {"haproxy": config_lines(haproxy, ("nbthread", "tune.", "mode", "option")),
            "nginx": config_lines(nginx, ("worker_processes", "proxy_buffer_size"))}


def worker_pid(master: int, timeout: float = 10.0) -> int:
    """nginx's one worker (it does the proxying; the master only waits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{master}/task/{master}/children", encoding="ascii") as f:
            kids = f.read().split()
        if kids:
            return int(kids[0])
        time.sleep(0.05)
    raise SystemExit("nginx started no worker")


class Bench(Children):
    def __init__(self, args: argparse.Namespace, tmp: str) -> None:
        self.args = args
        self.tmp = tmp
        server_cpu, self.client_cpu = cpus()
        super().__init__(server_cpu)
        self.iperf, self.http = free_port(), free_port()
        self.hp_iperf, self.hp_http = free_port(), free_port()
        self.ng_iperf, self.ng_http = free_port(), free_port()

    def start(self) -> dict[str, int]:
        """Backends, haproxy and the agent; returns path name → iperf port, and http ports."""
        self.spawn(["iperf3", "-s", "-B", HOST, "-p", str(self.iperf)], pin=False)
        conf = os.path.join(self.tmp, "nginx.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(NGINX.format(dir=self.tmp, port=self.http))
        self.spawn(["nginx", "-c", conf, "-e", os.path.join(self.tmp, "nginx.err")], pin=False)
        hconf = os.path.join(self.tmp, "haproxy.cfg")
        with open(hconf, "w", encoding="utf-8") as f:
            f.write(HAPROXY.format(maxconn=self.args.idle + 1000, **vars(self)))
        self.haproxy = self.spawn(["haproxy", "-db", "-f", hconf])
        sconf = os.path.join(self.tmp, "stream.conf")
        self.stream_conf = NGINX_STREAM.format(dir=self.tmp, maxconn=self.args.idle + 1000,
                                               nofile=2 * self.args.idle + 2000, **vars(self))
        with open(sconf, "w", encoding="utf-8") as f:
            f.write(self.stream_conf)
        stream = self.spawn(["nginx", "-c", sconf, "-e", os.path.join(self.tmp, "stream.err")])
        self.nginx_pid = worker_pid(stream.pid)
        self.peers = peer_config(HAPROXY, self.stream_conf)
        mdir = os.path.join(self.tmp, "m")
        os.mkdir(mdir)
        with open(os.path.join(mdir, "svc.yaml"), "w", encoding="utf-8") as f:
            f.write(service("iperf", "10.96.0.10", 5201, self.iperf))
            f.write("---\n")
            f.write(service("http", "10.96.0.11", 80, self.http))
        cfg = os.path.join(self.tmp, "agent.yaml")
        with open(cfg, "w", encoding="utf-8") as f:
            f.write("modules: {edgeDNS: {enable: false}, edgeTunnel: {enable: false}, "
                    "edgeProxy: {maxConnections: 30000}}\n"
                    f"commonConfig: {{stateDir: {self.tmp}/state}}\n")
        self.admin = f"{HOST}:{free_port()}"
        self.agent_log = open(os.path.join(self.tmp, "agent.log"), "wb")
        self.agent = self.spawn([sys.executable, "-m", "edgemesh", "agent", "--config", cfg,
                                 "--manifests", mdir, "--no-iptables", "--admin", self.admin,
                                 "--node-name", "bench", "-v", "1"], stderr=self.agent_log,
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        ports = agent_ports(self.admin, self.agent_log.name)
        for port in (self.iperf, self.http, self.hp_iperf, self.hp_http, self.ng_iperf,
                     self.ng_http, *ports.values()):
            wait_port(port)
        return ports

    def client(self, argv: list[str]) -> str:
        return subprocess.run(["taskset", "-c", self.client_cpu, *argv], capture_output=True,
                              text=True, timeout=120).stdout

    def iperf_gbps(self, port: int) -> float:
        for _ in range(5):  # "the server is busy" right after a test: try again
            out = self.client(["iperf3", "-c", HOST, "-p", str(port), "-t",
                               str(self.args.seconds), "-J"])
            report = json.loads(out)
            if "error" not in report:
                return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
            time.sleep(0.5)
        raise SystemExit(f"iperf3 via port {port} failed: {report['error']}")

    def conns_per_second(self, port: int) -> float:
        out = self.client(["wrk", "-t1", "-c50", f"-d{self.args.seconds}s", "-H",
                           "Connection: close", f"http://{HOST}:{port}/"])
        for line in out.splitlines():
            if line.startswith("Requests/sec:") and float(line.split()[1]) > 0:
                return float(line.split()[1])
        raise SystemExit(f"wrk via port {port} made no requests:\n{out}")

    def idle_memory(self, pid: int, port: int) -> tuple[int, int, int, int]:
        """RSS KiB before, with ``--idle`` open connections, after closing them, and after a
        second open/close cycle (equal to the third when freed memory is reused)."""
        before = rss_kib(pid)
        during = after = 0
        for cycle in range(2):
            socks = [socket.create_connection((HOST, port), timeout=10)
                     for _ in range(self.args.idle)]
            time.sleep(1.0)  # connects to the backend finish
            if cycle == 0:
                during = rss_kib(pid)
            for s in socks:
                s.close()
            time.sleep(1.5)
            if cycle == 0:
                after = rss_kib(pid)
        return before, during, after, rss_kib(pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=int, default=5000)
    add_json_flag(parser)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # proxies hold 2 fds per connection
    if hard < 2 * args.idle + 1000:
        raise SystemExit(f"--idle {args.idle} needs an open-files limit of "
                         f"{2 * args.idle + 1000}; the hard limit is {hard}")
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args, tmp)
        try:
            run(bench, bench.start())
        finally:
            bench.stop()


def run(bench: Bench, agent: dict[str, int]) -> None:
    names = ("direct", "haproxy", "nginx", "agent")
    pids = {"direct": None, "haproxy": bench.haproxy.pid, "nginx": bench.nginx_pid,
            "agent": bench.agent.pid}
    tp: dict[str, list[float]] = {n: [] for n in names}
    cps: dict[str, list[float]] = {n: [] for n in names}
    cpu_gb: dict[str, list[float]] = {n: [] for n in names}
    cpu_conn: dict[str, list[float]] = {n: [] for n in names}
    seconds = bench.args.seconds
    iperf_ports = {"direct": bench.iperf, "haproxy": bench.hp_iperf, "nginx": bench.ng_iperf,
                   "agent": agent["iperf"]}
    http_ports = {"direct": bench.http, "haproxy": bench.hp_http, "nginx": bench.ng_http,
                  "agent": agent["http"]}
    print_peers(bench.peers)
    for rnd in range(bench.args.rounds):
        # the order rotates: no proxy always runs right after another's TIME_WAITs
        order = names[:1] + names[1 + rnd % 3:] + names[1:1 + rnd % 3]
        for name in order:
            c0 = cpu_seconds(pids[name])
            tp[name].append(bench.iperf_gbps(iperf_ports[name]))
            cpu_gb[name].append((cpu_seconds(pids[name]) - c0) / (tp[name][-1] * seconds / 8))
        for name in order:
            c0 = cpu_seconds(pids[name])
            cps[name].append(bench.conns_per_second(http_ports[name]))
            cpu_conn[name].append((cpu_seconds(pids[name]) - c0) * 1e6 / (cps[name][-1] * seconds))
    print(f"{'TCP throughput (iperf3, 1 stream)':<44} Gbit/s per round | proxy CPU s per GB")
    for name in names:
        print(f"  {name:<10} {' '.join(f'{v:7.2f}' for v in tp[name])} | "
              f"{statistics.median(cpu_gb[name]):.3f}")
    print(f"{'new connections/s (wrk, Connection: close)':<44} per round | proxy CPU us per conn")
    for name in names:
        print(f"  {name:<10} {' '.join(f'{v:9.0f}' for v in cps[name])} | "
              f"{statistics.median(cpu_conn[name]):.1f}")
    per_conn = {}
    if bench.args.idle:
        mem = {name: bench.idle_memory(pid, port) for name, pid, port in
               (("haproxy", bench.haproxy.pid, bench.hp_http),
                ("nginx", bench.nginx_pid, bench.ng_http),
                ("agent", bench.agent.pid, agent["http"]))}
        print(f"memory with {bench.args.idle} idle proxied connections (RSS KiB)")
        for name, (before, during, after, again) in mem.items():
            per_conn[name] = (during - before) / bench.args.idle
            print(f"  {name:<10} before {before:7d}  open {during:7d}  closed {after:7d}  "
                  f"after a 2nd cycle {again:7d}  per connection {per_conn[name]:.2f} KiB")

    def ratio(d: dict[str, list[float]], a: str, b: str) -> float:
        return median_ratio(d[a], d[b])
    print("ratios (median of per-round ratios)")
    for peer in ("haproxy", "nginx"):
        print(f"  vs {peer:<8} throughput {ratio(tp, 'agent', peer):.2f}   "
              f"new conns/s {ratio(cps, 'agent', peer):.2f}   "
              f"CPU per GB {peer}/agent {ratio(cpu_gb, peer, 'agent'):.2f}   "
              f"CPU per new connection {peer}/agent {ratio(cpu_conn, peer, 'agent'):.2f}")
    print(f"  throughput   agent/direct {ratio(tp, 'agent', 'direct'):.2f}   "
          f"haproxy/direct {ratio(tp, 'haproxy', 'direct'):.2f}   "
          f"nginx/direct {ratio(tp, 'nginx', 'direct'):.2f}")
    print("  (CPU ratios > 1: the agent spends less)")
    if per_conn:
        print("  memory       " + ", ".join(f"{n} {v:.2f} KiB/conn" for n, v in per_conn.items()))
    if bench.args.json:
        ratios = {}
        for peer in ("haproxy", "nginx"):
            ratios[f"throughput agent/{peer}"] = ratio(tp, "agent", peer)
            ratios[f"new conns/s agent/{peer}"] = ratio(cps, "agent", peer)
            ratios[f"CPU per GB {peer}/agent"] = ratio(cpu_gb, peer, "agent")
            ratios[f"CPU per conn {peer}/agent"] = ratio(cpu_conn, peer, "agent")
        ratios["throughput agent/direct"] = ratio(tp, "agent", "direct")
        medians = {f"{n} Gbit/s": statistics.median(tp[n]) for n in names}
        medians |= {f"{n} conns/s": statistics.median(cps[n]) for n in names}
        medians |= {f"{n} KiB/conn": v for n, v in per_conn.items()}
        emit("proxy", ratios, medians, bench.peers)


if __name__ == "__main__":
    main()
