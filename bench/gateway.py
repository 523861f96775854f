"""HTTP requests/s through `edgemesh gateway` against haproxy doing the same routing.

Both route by host and path to two nginx backends (``Host: shop.example.com``, ``/api/``
prefix to one, the rest to the other), one thread each (haproxy ``nbthread 1``), pinned to one
core with taskset, wrk (``-t1``) to the other, on loopback in the same run. Rounds are
interleaved; medians of per-round ratios are printed, of requests/s and of requests per
CPU-second of the proxy process (``/proc/PID/stat``), the "per core" comparison.

``--unique-targets`` gives every request its own target (``/api/x?n=<counter>``), so no head
repeats and neither the parsed-head memo nor the per-connection routing plans help.

    .venv/bin/python -m bench.gateway [--seconds 10] [--rounds 3] [--connections 32]
                                      [--unique-targets] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench.http import UNIQUE_TARGETS, cpu_seconds
from bench.proxy import cpus
from bench.report import add_json_flag, config_lines, emit, print_peers

SERVER_CPU, CLIENT_CPU = cpus()

HOST = "shop.example.com"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listening on 127.0.0.1:{port}")


def _nginx(tmp: str, ports: dict[str, int]) -> subprocess.Popen[bytes]:
    servers = "".join(f"server {{ listen 127.0.0.1:{p}; keepalive_requests 1000000; "
                      f"location / {{ return 200 '{name}\\n'; }} }}\n"
                      for name, p in ports.items())
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"daemon off; worker_processes 1; pid {tmp}/nginx.pid; error_log stderr;\n"
                f"events {{ worker_connections 4096; }}\n"
                f"http {{ access_log off; {servers} }}\n")
    return subprocess.Popen(["nginx", "-c", conf, "-p", tmp], stderr=subprocess.DEVNULL)


def _haproxy(tmp: str, port: int, backends: dict[str, int]) -> subprocess.Popen[bytes]:
    conf = os.path.join(tmp, "haproxy.cfg")
    with open(conf, "w") as f:
        f.write(f"""global
    nbthread 1
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend fe
    bind 127.0.0.1:{port}
    acl shop hdr(host) -i {HOST}
    acl api path_beg /api/
    use_backend be_api if shop api
    use_backend be_web if shop
backend be_api
    server s1 127.0.0.1:{backends['api']}
backend be_web
    server s1 127.0.0.1:{backends['web']}
""")
    return subprocess.Popen(["taskset", "-c", SERVER_CPU, "haproxy", "-f", conf],
                            stderr=subprocess.DEVNULL)


def _manifests(tmp: str, port: int, backends: dict[str, int]) -> str:
    mdir = os.path.join(tmp, "manifests")
    os.makedirs(mdir)
    docs = []
    for i, (name, p) in enumerate(backends.items()):
        docs += [{"apiVersion": "v1", "kind": "Service",
                  "metadata": {"name": name, "namespace": "bench"},
                  "spec": {"clusterIP": f"10.96.99.{i + 1}",
                           "ports": [{"name": "http", "port": 80, "targetPort": p}]}},
                 {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                  "metadata": {"name": f"{name}-1", "namespace": "bench",
                               "labels": {"kubernetes.io/service-name": name}},
                  "addressType": "IPv4", "ports": [{"name": "http", "port": p}],
                  "endpoints": [{"addresses": ["127.0.0.1"]}]}]
    docs.append({"apiVersion": "networking.istio.io/v1beta1", "kind": "Gateway",
                 "metadata": {"name": "bench", "namespace": "bench"},
                 "spec": {"servers": [{"port": {"number": port, "name": "http",
                                                "protocol": "HTTP"}, "hosts": ["*"]}]}})
    docs.append({"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
                 "metadata": {"name": "shop", "namespace": "bench"},
                 "spec": {"hosts": [HOST], "gateways": ["bench"], "http": [
                     {"match": [{"uri": {"prefix": "/api/"}}],
                      "route": [{"destination": {"host": "api"}}]},
                     {"route": [{"destination": {"host": "web"}}]}]}})
    with open(os.path.join(mdir, "all.json"), "w") as f:
        f.write("\n".join(json.dumps(d) for d in docs))
    return mdir


def _gateway(tmp: str, port: int, backends: dict[str, int]) -> tuple[subprocess.Popen[bytes],
                                                                      str]:
    mdir = _manifests(tmp, port, backends)
    config = os.path.join(tmp, "gw.json")
    with open(config, "w") as f:
        json.dump({"kind": "EdgeMeshGateway", "modules": {"edgeTunnel": {"enable": False}}}, f)
    admin = f"127.0.0.1:{_free_port()}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, sys.executable, "-m", "edgemesh",
                             "gateway", "--config", config,
                             "--manifests", mdir, "--admin", admin, "--nic", "lo",
                             "--include-ip", "127.0.0.1", "--state-dir",
                             os.path.join(tmp, "state"), "--node-name", "bench", "-v", "0"],
                            cwd=root, env={**os.environ, "PYTHONPATH": root},
                            stderr=subprocess.DEVNULL)
    return proc, admin


def _wrk(port: int, path: str, seconds: int, connections: int, pid: int = 0,
         script: tuple[str, ...] = ()) -> tuple[float, float]:
    """(requests/s, requests per CPU-second of process ``pid``)."""
    before = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(["taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{connections}",
                          f"-d{seconds}s", *script, "-H", f"Host: {HOST}", f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, check=True).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise SystemExit(f"errors through port {port}: {non2xx.group(1)}\n{out}")
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if m is None or total is None:
        raise SystemExit(out)
    used = cpu_seconds(pid) - before if pid else 0.0
    return float(m.group(1)), (int(total.group(1)) / used if used else 0.0)


def _check(port: int, path: str, want: str) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": HOST})
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read().decode().strip()
    if body != want:
        raise SystemExit(f"port {port} {path}: routed to {body!r}, expected {want!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--unique-targets", action="store_true",
                        help="a different request target on every request")
    add_json_flag(parser)
    args = parser.parse_args()
    for tool in ("nginx", "haproxy", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool}")
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="em-bench-gw-") as tmp:
        try:
            backends = {"api": _free_port(), "web": _free_port()}
            procs.append(_nginx(tmp, backends))
            hp, gp = _free_port(), _free_port()
            haproxy = _haproxy(tmp, hp, backends)
            with open(os.path.join(tmp, "haproxy.cfg"), encoding="utf-8") as f:
                peers = {"haproxy": config_lines(f.read(), ("nbthread", "mode", "option",
                                                            "http-reuse", "acl", "use_backend"))}
            print_peers(peers)
            procs.append(haproxy)
            gw, _admin = _gateway(tmp, gp, backends)
            procs.append(gw)
            for p in (*backends.values(), hp, gp):
                _wait_port(p)
            for port in (hp, gp):
                _check(port, "/api/x", "api")
                _check(port, "/", "web")
            paths = (("haproxy", hp, haproxy.pid), ("edgemesh", gp, gw.pid))
            script: tuple[str, ...] = ()
            if args.unique_targets:
                lua = os.path.join(tmp, "unique.lua")
                with open(lua, "w") as f:
                    f.write(UNIQUE_TARGETS.replace('"/?n="', '"/api/x?n="'))
                script = ("-s", lua)
            for _, port, _ in paths:
                _wrk(port, "/api/x", 1, args.connections)  # warm up
            rounds = []
            for r in range(args.rounds):
                result = {name: _wrk(port, "/api/x", args.seconds, args.connections, pid,
                                     script) for name, port, pid in paths}
                rounds.append(result)
                print(f"round {r + 1}: " + ", ".join(
                    f"{n} {rps:,.0f} req/s ({per:,.0f}/cpu-s)" for n, (rps, per) in
                    result.items()))
            rps = statistics.median(r["edgemesh"][0] / r["haproxy"][0] for r in rounds)
            per = statistics.median(r["edgemesh"][1] / r["haproxy"][1] for r in rounds)
            print(f"HTTP host+path routing, wrk -t1 -c{args.connections}, {args.seconds}s, "
                  f"one core each, medians of {args.rounds} per-round ratios:")
            print(f"  edgemesh gateway {rps:.2f}x haproxy req/s, {per:.2f}x haproxy req per "
                  "CPU-second")
            if args.json:
                emit("gateway", {"req/s edgemesh/haproxy": rps,
                                 "req per CPU-s edgemesh/haproxy": per},
                     {f"{n} req/s": statistics.median(r[n][0] for r in rounds)
                      for n in ("haproxy", "edgemesh")}, peers)
        finally:
            for p in procs:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    main()
