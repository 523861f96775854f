"""HTTP keep-alive: the agent per request and spliced vs haproxy (mode http, nbthread 1) vs direct.

Everything runs on loopback: a one-worker nginx answering a small body is the endpoint; the
agent (``--no-iptables``, listeners found in ``/debug/proxy``) serves two services in front of
it: ``perreq``, balanced per request (a DestinationRule ``consistentHash.httpHeaderName`` puts
it in per-request mode; wrk sends no such header, so requests fall back to round robin), and
``spliced``, an http port carried as TCP (the default). haproxy ``mode http`` with one thread
fronts the same nginx. The proxies are pinned to one core with taskset, wrk (``-t1 -c50``) to
the other. Rounds are interleaved; medians of per-round ratios are printed, with requests per
second per CPU-second of the proxy process (``/proc/PID/stat``) for the "per core" comparison.

``--unique-targets`` gives every request its own target (``/?n=<counter>``, a wrk Lua
script), so no request head is ever seen twice: the cost of parsing, not of the parsed-head
memo (``proxy/httpflow.py``).

    .venv/bin/python -m bench.http [--seconds 5] [--rounds 3] [--connections 50]
                                   [--unique-targets] [--json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from bench.listeners import agent_ports, service
from bench.processes import Children, cpu_seconds
from bench.proxy import HOST, ROOT, cpus, free_port, wait_port
from bench.report import add_json_flag, config_lines, emit, print_peers

RULE = """apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: perreq, namespace: bench}
spec:
  host: perreq
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
"""

NGINX = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx.err;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  server {{ listen 127.0.0.1:{port} backlog=4096;
           location / {{ default_type text/plain; return 200 "hello from nginx\\n"; }} }}
}}
"""

HAPROXY = """global
  nbthread 1
  maxconn 4000
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen http
  bind 127.0.0.1:{hp}
  server s1 127.0.0.1:{nginx}
"""


UNIQUE_TARGETS = """counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, "/?n=" .. counter)
end
"""


class Bench(Children):
    def __init__(self, args: argparse.Namespace, tmp: str) -> None:
        self.args, self.tmp = args, tmp
        server_cpu, self.client_cpu = cpus()
        super().__init__(server_cpu)
        self.nginx, self.hp = free_port(), free_port()

    def start(self) -> dict[str, tuple[int, int | None]]:
        """Path name → (port, pid of the proxy or None for direct)."""
        conf = os.path.join(self.tmp, "nginx.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(NGINX.format(dir=self.tmp, port=self.nginx))
        self.spawn(["nginx", "-c", conf, "-e", os.path.join(self.tmp, "nginx.err")], pin=False)
        hconf = os.path.join(self.tmp, "haproxy.cfg")
        with open(hconf, "w", encoding="utf-8") as f:
            f.write(HAPROXY.format(hp=self.hp, nginx=self.nginx))
        haproxy = self.spawn(["haproxy", "-db", "-f", hconf])
        mdir = os.path.join(self.tmp, "m")
        os.mkdir(mdir)
        with open(os.path.join(mdir, "svc.yaml"), "w", encoding="utf-8") as f:
            for name, ip in (("perreq", "10.96.0.21"), ("spliced", "10.96.0.22")):
                f.write(service(name, ip, 80, self.nginx, port_name="http") + "---\n")
            f.write(RULE)
        cfg = os.path.join(self.tmp, "agent.yaml")
        with open(cfg, "w", encoding="utf-8") as f:
            f.write("modules: {edgeDNS: {enable: false}, edgeTunnel: {enable: false}}\n"
                    f"commonConfig: {{stateDir: {self.tmp}/state}}\n")
        self.admin = f"{HOST}:{free_port()}"
        self.agent_log = open(os.path.join(self.tmp, "agent.log"), "wb")
        agent = self.spawn([sys.executable, "-m", "edgemesh", "agent", "--config", cfg,
                            "--manifests", mdir, "--no-iptables", "--admin", self.admin,
                            "--node-name", "bench", "-v", "0"], stderr=self.agent_log,
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        ports = agent_ports(self.admin, self.agent_log.name)
        for port in (self.nginx, self.hp, *ports.values()):
            wait_port(port)
        return {"direct": (self.nginx, None), "haproxy": (self.hp, haproxy.pid),
                "agent per request": (ports["perreq"], agent.pid),
                "agent spliced": (ports["spliced"], agent.pid)}

    def wrk(self, port: int, pid: int | None) -> tuple[float, float]:
        """(requests/s, requests per CPU-second of the proxy; 0 for direct)."""
        before = cpu_seconds(pid) if pid else 0.0
        script = []
        if self.args.unique_targets:
            lua = os.path.join(self.tmp, "unique.lua")
            with open(lua, "w", encoding="utf-8") as f:
                f.write(UNIQUE_TARGETS)
            script = ["-s", lua]
        out = subprocess.run(["taskset", "-c", self.client_cpu, "wrk", "-t1",
                              f"-c{self.args.connections}", f"-d{self.args.seconds}s",
                              *script, f"http://{HOST}:{port}/"], capture_output=True,
                             text=True, timeout=self.args.seconds + 60).stdout
        used = cpu_seconds(pid) - before if pid else 0.0
        total = next((int(line.split()[0]) for line in out.splitlines()
                      if "requests in" in line), 0)
        errors = [line for line in out.splitlines() if "Non-2xx" in line or "errors" in line]
        if errors:
            print("  wrk:", "; ".join(e.strip() for e in errors))
        for line in out.splitlines():
            if line.startswith("Requests/sec:"):
                return float(line.split()[1]), (total / used if used else 0.0)
        raise SystemExit("wrk printed no rate:\n" + out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--unique-targets", action="store_true",
                        help="a different request target on every request")
    add_json_flag(parser)
    args = parser.parse_args()
    peers = {"haproxy": config_lines(HAPROXY, ("nbthread", "mode", "option", "http-reuse"))}
    print_peers(peers)
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args, tmp)
        try:
            paths = bench.start()
            rounds: list[dict[str, tuple[float, float]]] = []
            for r in range(args.rounds):
                result = {name: bench.wrk(port, pid) for name, (port, pid) in paths.items()}
                rounds.append(result)
                print(f"round {r + 1}: " + ", ".join(f"{n} {rps:,.0f} req/s"
                                                     + (f" ({per:,.0f}/cpu-s)" if per else "")
                                                     for n, (rps, per) in result.items()))
        finally:
            bench.stop()

    def median(fn) -> float:  # type: ignore[no-untyped-def]
        return statistics.median(fn(r) for r in rounds)
    print(f"\nHTTP/1.1 keep-alive, wrk -t1 -c{args.connections}, medians of {args.rounds} "
          "per-round ratios:")
    for name in ("haproxy", "agent per request", "agent spliced"):
        print(f"  {name:<18} {median(lambda r, n=name: r[n][0] / r['direct'][0]):.2f}x direct")
    for name in ("agent per request", "agent spliced"):
        print(f"  {name:<18} {median(lambda r, n=name: r[n][0] / r['haproxy'][0]):.2f}x "
              f"haproxy req/s, {median(lambda r, n=name: r[n][1] / r['haproxy'][1]):.2f}x "
              "haproxy req per CPU-second")
    if args.json:
        ratios, medians = {}, {}
        for name in ("agent per request", "agent spliced"):
            ratios[f"{name} req/s / haproxy"] = median(lambda r, n=name: r[n][0] / r["haproxy"][0])
            ratios[f"{name} req per CPU-s / haproxy"] = median(
                lambda r, n=name: r[n][1] / r["haproxy"][1])
        for name in ("direct", "haproxy", "agent per request", "agent spliced"):
            medians[f"{name} req/s"] = median(lambda r, n=name: r[n][0])
        emit("http", ratios, medians, peers)


if __name__ == "__main__":
    main()
