"""Edge CNI: a remote Pod by its IP vs the same Pod through a ClusterIP service vs raw TCP.

One run builds a NAT lab (sites A and B behind routers that drop inbound traffic, a relay on
the "internet"; hole punching on, so the agents' tunnel is punched where it can be, relayed
otherwise), a Pod on b1 in a network namespace of its own (``10.244.2.5``: iperf3 and a
one-byte echo server) and a ClusterIP service ``10.96.3.1`` whose only endpoint is that Pod.
From a1, in the same run, interleaved for ``--rounds`` rounds:

- throughput: ``iperf3 -c`` (one stream) to the Pod IP, to the ClusterIP, and raw to the relay
  host (a1's own uplink, no agent: the reference for what the namespaces carry);
- connection setup: sequential connections (connect, one byte there and back, close), the
  median per connection, to each of the same three.

Printed: the medians and the median of per-round ratios Pod-IP/service (both go through the
same tunnel, so the Pod-IP path's own cost shows), and the two agents' CPU seconds per GB and
per connection on each path, which the machine's load disturbs less than rates do. Targets:
Pod-IP throughput >= 0.9x the service path, Pod-IP connection setup <= 1.2x the service path.

    .venv/bin/python -m bench.edge_cni [--seconds 4] [--rounds 5] [--conns 200] [--json]

``--json`` prints one JSON line (the ratios and medians) instead of the table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
from statistics import median

import yaml

from bench.tunnel import cpu_seconds, iperf
from tests import netlab
from tests.procs import Proc, wait_ready

ADMIN = "127.0.0.1:10557"
NODES = {"a1": "192.168.10.2", "b1": "192.168.20.2"}
RELAY = "198.18.0.10"
POD = "10.244.2.5"
SERVICE = "10.96.3.1"
ECHO_PORT = 7000

ECHO = textwrap.dedent("""
    import socket, threading
    def serve(c):
        with c:
            while data := c.recv(65536): c.sendall(data)
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 7000)); s.listen(1024)
    while True:
        c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
""")
CONNECT = textwrap.dedent("""
    import socket, sys, time
    ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]); samples = []
    for _ in range(n):
        t = time.perf_counter()
        s = socket.create_connection((ip, port), timeout=10)
        s.sendall(b"x"); assert s.recv(1) == b"x"; s.close()
        samples.append(time.perf_counter() - t)
    samples.sort(); print(samples[len(samples) // 2] * 1e6)
""")


def docs() -> list[dict]:
    out: list[dict] = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": n},
                        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}
                       for n, ip in NODES.items()]
    ports = [("iperf", 5201), ("echo", ECHO_PORT)]
    out += [{"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "pod", "namespace": "default"},
             "spec": {"clusterIP": SERVICE, "ports": [{"name": n, "port": p, "targetPort": p}
                                                      for n, p in ports]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "pod-1", "namespace": "default",
                          "labels": {"kubernetes.io/service-name": "pod"}},
             "addressType": "IPv4", "ports": [{"name": n, "port": p} for n, p in ports],
             "endpoints": [{"addresses": [POD], "nodeName": "b1",
                            "targetRef": {"kind": "Pod", "namespace": "default",
                                          "name": "pod-0"}}]}]
    return out


def connect_us(ns: netlab.Netns, ip: str, n: int) -> float:
    """The median time of one connection (connect, 1 byte echoed, close), microseconds."""
    return float(ns.run("python3", "-c", CONNECT, ip, str(ECHO_PORT), str(n),
                        timeout=n + 60).stdout)


def build(lab: netlab.Lab, tmp: str) -> tuple[dict[str, netlab.Netns], list[Proc]]:
    inet = lab.switch("inet", "198.18.0.254/24")
    srv = lab.host("srv", inet, f"{RELAY}/24")
    a = lab.site("a", inet, wan="198.18.0.1/24", lan="192.168.10.1/24")
    b = lab.site("b", inet, wan="198.18.0.2/24", lan="192.168.20.1/24")
    ns = {"a1": lab.host("a1", a.lan, f"{NODES['a1']}/24", gw="192.168.10.1"),
          "b1": lab.host("b1", b.lan, f"{NODES['b1']}/24", gw="192.168.20.1"), "srv": srv}
    pod = lab.netns("b1pod")
    netlab.sh("ip", "link", "add", "name", "eth0", "netns", pod.name, "type", "veth", "peer",
              "name", "veth-pod", "netns", ns["b1"].name)
    ns["b1"].run("ip", "addr", "add", "10.244.2.1/24", "dev", "veth-pod")
    ns["b1"].run("ip", "link", "set", "veth-pod", "up")
    pod.run("ip", "link", "set", "eth0", "up")
    pod.run("ip", "addr", "add", f"{POD}/24", "dev", "eth0")
    pod.run("ip", "route", "add", "default", "via", "10.244.2.1")
    for where in (pod, srv):
        where.popen(["iperf3", "-s", "-p", "5201"])
        where.popen(["python3", "-c", ECHO])
        where.wait_listening(f"*:{5201}", f"0.0.0.0:{ECHO_PORT}")
    mdir = os.path.join(tmp, "m")
    os.mkdir(mdir)
    with open(os.path.join(mdir, "all.yaml"), "w") as f:
        yaml.safe_dump_all(docs(), f)
    psk = os.path.join(tmp, "psk")
    with open(psk, "w") as f:
        f.write("benchmark cluster secret, long enough")
    scfg = os.path.join(tmp, "server.yaml")
    with open(scfg, "w") as f:
        yaml.safe_dump({"kind": "EdgeMeshServer", "server": {"relayBytesPerSecond": 10**11}}, f)
    cfg = os.path.join(tmp, "agent.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump({"modules": {"edgeDNS": {"enable": False},
                                    "edgeCNI": {"enable": True}}}, f)
    procs = [Proc(["server", "--config", scfg, "--listen", "0.0.0.0:20004", "--psk-file", psk,
                   "--state-dir", os.path.join(tmp, "s-srv"), "--admin", ""], ns=srv)]
    for n in NODES:
        p = Proc(["agent", "--config", cfg, "--manifests", mdir, "--node-name", n, "--server",
                  f"{RELAY}:20004", "--psk-file", psk, "--state-dir", os.path.join(tmp, f"s-{n}"),
                  "--admin", ADMIN], ns=ns[n])
        procs.append(p)
        wait_ready(p, ADMIN, ns[n], timeout=60)
    return ns, procs


def measure(args: argparse.Namespace) -> dict:
    with netlab.Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        ns, procs = build(lab, tmp)
        try:
            a1 = ns["a1"]
            targets = {"pod": POD, "service": SERVICE, "raw": RELAY}
            netlab.wait_for(lambda: all(connect_us(a1, ip, 3) for ip in targets.values()),
                            timeout=60, interval=1, what="every path answers")
            agents = procs[1:]
            gbps: dict[str, list[float]] = {k: [] for k in targets}
            conn: dict[str, list[float]] = {k: [] for k in targets}
            cpu_gb: dict[str, list[float]] = {"pod": [], "service": []}  # both agents, s/GB
            cpu_conn: dict[str, list[float]] = {"pod": [], "service": []}  # us/connection
            for i in range(args.rounds):  # interleaved, the order alternating: drift hits both
                order = list(targets) if i % 2 == 0 else list(reversed(targets))
                for k in order:
                    before = sum(cpu_seconds(p) for p in agents)
                    rate, nbytes = iperf(a1, targets[k], args.seconds)
                    gbps[k].append(rate)
                    if k in cpu_gb:
                        cpu_gb[k].append((sum(cpu_seconds(p) for p in agents) - before)
                                         / (nbytes / 1e9))
                for k in order:
                    before = sum(cpu_seconds(p) for p in agents)
                    conn[k].append(connect_us(a1, targets[k], args.conns))
                    if k in cpu_conn:
                        cpu_conn[k].append((sum(cpu_seconds(p) for p in agents) - before)
                                           / args.conns * 1e6)
            status = json.loads(a1.run(sys.executable, "-m", "edgemesh", "status", "--json",
                                       "--admin", ADMIN).stdout)
        finally:
            for p in procs:
                p.stop()
    path = next((p.get("path") for p in status.get("peers", []) if p["node"] == "b1"), None)
    return {
        "throughput_ratio": median(p / s for p, s in zip(gbps["pod"], gbps["service"],
                                                          strict=True)),
        "connect_ratio": median(p / s for p, s in zip(conn["pod"], conn["service"],
                                                       strict=True)),
        "pod_vs_raw_throughput": median(p / r for p, r in zip(gbps["pod"], gbps["raw"],
                                                               strict=True)),
        "cpu_per_gb_ratio": median(p / s for p, s in zip(cpu_gb["pod"], cpu_gb["service"],
                                                          strict=True)),
        "cpu_per_connection_ratio": median(p / s for p, s in zip(
            cpu_conn["pod"], cpu_conn["service"], strict=True)),
        "gbps": {k: median(v) for k, v in gbps.items()},
        "connect_us": {k: median(v) for k, v in conn.items()},
        "agents_cpu_s_per_gb": {k: median(v) for k, v in cpu_gb.items()},
        "agents_cpu_us_per_connection": {k: median(v) for k, v in cpu_conn.items()},
        "rounds": args.rounds, "tunnel_path": path,
        "targets_met": None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4, help="per iperf3 run")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of every path; the ratios are medians of per-round ones")
    parser.add_argument("--conns", type=int, default=200, help="connections per round and path")
    parser.add_argument("--json", action="store_true", help="one JSON line, no table")
    args = parser.parse_args()
    reason = netlab.can_run()
    if reason:
        print(f"skipped: {reason}")
        return 0
    r = measure(args)
    r["targets_met"] = r["throughput_ratio"] >= 0.9 and r["connect_ratio"] <= 1.2
    if args.json:
        print(json.dumps(r, sort_keys=True))
        return 0
    print(f"a1 -> b1's Pod across two NATs (tunnel path: {r['tunnel_path']}), "
          f"{args.rounds} rounds")
    print(f"{'path':10} {'Gbit/s':>8} {'conn us':>9} {'agents CPU s/GB':>16} "
          f"{'agents CPU us/conn':>19}")
    for k, label in (("pod", "Pod IP"), ("service", "ClusterIP"), ("raw", "raw TCP")):
        per_gb = r["agents_cpu_s_per_gb"].get(k)
        per_conn = r["agents_cpu_us_per_connection"].get(k)
        print(f"{label:10} {r['gbps'][k]:8.2f} {r['connect_us'][k]:9.0f} "
              f"{'-' if per_gb is None else f'{per_gb:.3f}':>16} "
              f"{'-' if per_conn is None else f'{per_conn:.0f}':>19}")
    print(f"Pod IP / ClusterIP throughput {r['throughput_ratio']:.2f}x (target >= 0.9), "
          f"connection setup {r['connect_ratio']:.2f}x (target <= 1.2); "
          f"Pod IP / raw throughput {r['pod_vs_raw_throughput']:.2f}x")
    print(f"agents' CPU, Pod IP / ClusterIP: per GB {r['cpu_per_gb_ratio']:.2f}x, "
          f"per connection {r['cpu_per_connection_ratio']:.2f}x")
    print("targets met" if r["targets_met"] else "targets NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
