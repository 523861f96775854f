"""Tunnel throughput and added latency node to node, direct and relayed, against iperf3 raw.

One run builds the e2e lab (two NATed sites, a server on the "internet"), then measures in
the same namespaces:
  raw direct   iperf3 a1 -> a2 (same LAN)              vs  tunnel direct: a1 -> ClusterIP ->
  raw relay    iperf3 a1 -> server (a1's uplink)            proxy -> tunnel -> a2/b1 -> iperf3
the round trip of 1-byte request/response over each path (TCP ping-pong; "added us" is the
tunnel's minus raw's), and a 4 MiB transfer on a new connection a1 -> a2 (connect, read to the
server's close) through the tunnel vs straight, alternately (the median of per-round time
ratios); and prints the ratios (throughput: the median of per-round ratios, raw and tunnel
measured alternately) and the CPU seconds per GB of the sending (a1) and receiving (a2/b1)
agents, which the machine's load disturbs less than throughput does.
Targets (issue 20): direct tunnel >= 0.6x raw, relay >= 0.5x raw, added round trip <= 150 us,
the 4 MiB transfer <= 1.5x the time straight.

    .venv/bin/python -m bench.tunnel [--seconds 5] [--rounds 3] [--xfers 15] [--profile DIR]
        [--json]

``--json`` also prints one JSON line (ratios, medians, the peer), as every bench does.

``--profile DIR`` records the agents (and the relay server) with py-spy during the first tunnel
throughput run and the tunnel round trips (collapsed stacks in DIR, ``PATH-NODE.txt`` and
``PATH-rtt-NODE.txt``; py-spy must be installed, it is not a project dependency).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from statistics import median

import yaml

from bench.report import add_json_flag, emit
from tests import netlab
from tests.procs import Proc, wait_ready

POD = "172.17.0.2"
ADMIN = "127.0.0.1:10557"
NODES = {"a1": "192.168.10.2", "a2": "192.168.10.3", "b1": "192.168.20.2"}

PINGPONG = textwrap.dedent("""
    import socket, sys, time
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    n = int(sys.argv[3]); samples = []
    for _ in range(n):
        t = time.perf_counter(); s.sendall(b"x"); s.recv(1); samples.append(time.perf_counter() - t)
    samples.sort(); print(samples[len(samples) // 2] * 1e6)
""")

XFER_SIZE = 4 * 1024 * 1024
XFER_SERVER = textwrap.dedent("""
    import socket, threading
    data = bytes(4 * 1024 * 1024)
    srv = socket.create_server(("0.0.0.0", 7001), backlog=64)
    def serve(c):
        with c:
            c.sendall(data)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
""")
XFER_CLIENT = textwrap.dedent("""
    import json, socket, sys, time
    def once(ip):
        t = time.perf_counter(); n = 0; first = None
        with socket.create_connection((ip, 7001), timeout=30) as s:
            buf = bytearray(1 << 20)
            while k := s.recv_into(buf):
                n += k
                first = first or time.perf_counter() - t
        assert n == 4 * 1024 * 1024, n
        return time.perf_counter() - t, first
    once(sys.argv[1]); once(sys.argv[2])  # warm up (ARP, conntrack, the proxy's rules)
    print(json.dumps([(*once(sys.argv[1]), *once(sys.argv[2]))
                      for _ in range(int(sys.argv[3]))]))
""")


def docs() -> list[dict]:
    out: list[dict] = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": n},
                        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}
                       for n, ip in NODES.items()]
    for name, ip, node, port in (("iperf-a2", "10.96.2.1", "a2", 5201),
                                 ("iperf-b1", "10.96.2.2", "b1", 5201),
                                 ("echo-a2", "10.96.2.3", "a2", 7000),
                                 ("echo-b1", "10.96.2.4", "b1", 7000),
                                 ("xfer-a2", "10.96.2.5", "a2", 7001)):
        out += [{"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": name, "namespace": "default"},
                 "spec": {"clusterIP": ip, "ports": [{"name": "tcp", "port": port,
                                                      "targetPort": port}]}},
                {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                 "metadata": {"name": f"{name}-1", "namespace": "default",
                              "labels": {"kubernetes.io/service-name": name}},
                 "addressType": "IPv4", "ports": [{"name": "tcp", "port": port}],
                 "endpoints": [{"addresses": [POD], "nodeName": node}]}]
    return out


def iperf(ns: netlab.Netns, ip: str, seconds: int) -> tuple[float, int]:
    """Gbit/s and bytes received of one iperf3 run."""
    out = ns.run("iperf3", "-c", ip, "-t", str(seconds), "-J", timeout=seconds + 60).stdout
    got = json.loads(out)["end"]["sum_received"]
    return float(got["bits_per_second"]) / 1e9, int(got["bytes"])


def cpu_seconds(proc: Proc) -> float:
    """User + system CPU the process used so far (/proc/PID/stat)."""
    with open(f"/proc/{proc.popen.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rtt_us(ns: netlab.Netns, ip: str, port: int, n: int = 2000) -> float:
    return float(ns.run("python3", "-c", PINGPONG, ip, str(port), str(n), timeout=120).stdout)


def xfers(ns: netlab.Netns, raw_ip: str, tun_ip: str, n: int) -> list[tuple[float, ...]]:
    """(seconds straight, to its first byte, seconds through the tunnel, to its first byte)
    of ``n`` alternate 4 MiB transfers."""
    out = ns.run("python3", "-c", XFER_CLIENT, raw_ip, tun_ip, str(n), timeout=60 + 10 * n)
    return [tuple(row) for row in json.loads(out.stdout)]


@contextlib.contextmanager
def profiled(outdir: str | None, name: str, procs: dict[str, Proc]) -> Iterator[None]:
    """py-spy records ``procs`` while the body runs (nothing when ``outdir`` is None)."""
    spies = []
    if outdir is not None:
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        for label, proc in procs.items():
            out = os.path.join(outdir, f"{name}-{label}.txt")
            spies.append(subprocess.Popen([spy, "record", "--format", "raw", "-r", "200",
                                           "-o", out, "-p", str(proc.popen.pid)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        yield
    finally:
        for spy_proc in spies:
            spy_proc.send_signal(2)
            spy_proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3,
                        help="raw/tunnel pairs per path; the ratio is their median")
    parser.add_argument("--xfers", type=int, default=15,
                        help="4 MiB transfers per side (new connection each)")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the agents into DIR")
    add_json_flag(parser)
    args = parser.parse_args()
    reason = netlab.can_run()
    if reason:
        print(f"skipped: {reason}")
        return 0
    with netlab.Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        inet = lab.switch("inet", "198.18.0.254/24")
        srv = lab.host("srv", inet, "198.18.0.10/24")
        a = lab.site("a", inet, wan="198.18.0.1/24", lan="192.168.10.1/24")
        # symmetric-like NAT at b: no hole punching, so b1 is reached through the relay
        b = lab.site("b", inet, wan="198.18.0.2/24", lan="192.168.20.1/24",
                     nat="random-fully")
        ns = {n: lab.host(n, (a if n[0] == "a" else b).lan, f"{ip}/24",
                          gw="192.168.10.1" if n[0] == "a" else "192.168.20.1")
              for n, ip in NODES.items()}
        for n in ("a2", "b1"):
            ns[n].run("ip", "addr", "add", f"{POD}/32", "dev", "lo")
            ns[n].popen(["iperf3", "-s", "-p", "5201"])
            ns[n].popen(["socat", "TCP-LISTEN:7000,reuseaddr,fork", "SYSTEM:cat"])
        ns["a2"].popen(["python3", "-c", XFER_SERVER])
        srv.popen(["iperf3", "-s", "-p", "5201"])
        srv.popen(["socat", "TCP-LISTEN:7000,reuseaddr,fork", "SYSTEM:cat"])
        mdir = os.path.join(tmp, "m")
        os.mkdir(mdir)
        with open(os.path.join(mdir, "all.yaml"), "w") as f:
            yaml.safe_dump_all(docs(), f)
        psk = os.path.join(tmp, "psk")
        with open(psk, "w") as f:
            f.write("benchmark cluster secret, long enough")
        scfg = os.path.join(tmp, "server.yaml")
        with open(scfg, "w") as f:
            yaml.safe_dump({"kind": "EdgeMeshServer",
                            "server": {"relayBytesPerSecond": 10**11}}, f)
        cfg = os.path.join(tmp, "agent.yaml")
        with open(cfg, "w") as f:
            yaml.safe_dump({"modules": {"edgeDNS": {"enable": False}}}, f)
        procs = [Proc(["server", "--config", scfg, "--listen", "0.0.0.0:20004", "--psk-file",
                       psk, "--state-dir", os.path.join(tmp, "s-srv"), "--admin", ""],
                      ns=srv)]
        agents: dict[str, Proc] = {}
        for n in NODES:
            p = Proc(["agent", "--config", cfg, "--manifests", mdir, "--node-name", n,
                      "--server", "198.18.0.10:20004", "--psk-file", psk, "--state-dir",
                      os.path.join(tmp, f"s-{n}"), "--admin", ADMIN, "-v", "1"], ns=ns[n])
            procs.append(p)
            agents[n] = p
            wait_ready(p, ADMIN, ns[n], timeout=40)
        a1 = ns["a1"]
        rtt_us(a1, "10.96.2.3", 7000, 10)  # establish both sessions before measuring
        rtt_us(a1, "10.96.2.4", 7000, 10)
        spied = {"direct": {"a1": agents["a1"], "a2": agents["a2"]},
                 "relay": {"a1": agents["a1"], "srv": procs[0], "b1": agents["b1"]}}
        rows = []
        for name, raw_ip, tun_ip, echo_ip in (("direct", NODES["a2"], "10.96.2.1", "10.96.2.3"),
                                              ("relay", "198.18.0.10", "10.96.2.2",
                                               "10.96.2.4")):
            raws, tuns, ratios, cpus = [], [], [], []
            ends = (agents["a1"], agents["a2" if name == "direct" else "b1"])
            for i in range(args.rounds):  # interleaved: drift hits both sides of a ratio
                raws.append(iperf(a1, raw_ip, args.seconds)[0])
                before = [cpu_seconds(p) for p in ends]
                with profiled(args.profile if i == 0 else None, name, spied[name]):
                    gbps, nbytes = iperf(a1, tun_ip, args.seconds)
                tuns.append(gbps)
                # CPU seconds per GB moved, sender's agent and receiver's: noise-proof-ish
                cpus.append([(cpu_seconds(p) - b) / (nbytes / 1e9) for p, b in zip(ends, before,
                                                                                 strict=True)])
                ratios.append(tuns[-1] / raws[-1])
            raw_rtt = rtt_us(a1, raw_ip, 7000)
            with profiled(args.profile, f"{name}-rtt", spied[name]):
                tun_rtt = rtt_us(a1, echo_ip, 7000)
            rows.append((name, median(raws), median(tuns), median(ratios), raw_rtt, tun_rtt,
                         median(c[0] for c in cpus), median(c[1] for c in cpus)))
        pairs = xfers(a1, NODES["a2"], "10.96.2.5", args.xfers)
        paths = json.loads(a1.run(sys.executable, "-m", "edgemesh", "status", "--json",
                                  "--admin", ADMIN).stdout)["peers"]
        for p in procs:
            p.stop()
    raw_ms, raw_first, tun_ms, tun_first = (median(p[i] for p in pairs) * 1e3
                                            for i in range(4))
    xfer_ratio = median(p[2] / p[0] for p in pairs)
    targets = {"direct": 0.6, "relay": 0.5}
    r: dict = {"paths": {p["node"]: p["path"] for p in paths},
               "xfer_4mib_ms": {"raw": round(raw_ms, 2), "tunnel": round(tun_ms, 2)},
               "xfer_first_byte_ms": {"raw": round(raw_first, 3), "tunnel": round(tun_first, 3)},
               "xfer_4mib_ratio": round(xfer_ratio, 3), "xfer_target": 1.5,
               "added_rtt_target_us": 150}
    ok = xfer_ratio <= 1.5
    for name, raw, tun, ratio, raw_rtt, tun_rtt, near, far in rows:
        ok &= ratio >= targets[name] and (name != "direct" or tun_rtt - raw_rtt <= 150)
        r[name] = {"raw_gbps": round(raw, 3), "tunnel_gbps": round(tun, 3),
                   "ratio": round(ratio, 3), "target": targets[name],
                   "raw_rtt_us": round(raw_rtt, 1), "tunnel_rtt_us": round(tun_rtt, 1),
                   "added_rtt_us": round(tun_rtt - raw_rtt, 1),
                   "a1_cpu_s_per_gb": round(near, 4), "far_cpu_s_per_gb": round(far, 4)}
    r["targets_met"] = ok
    print(f"{'path':8} {'raw Gbit/s':>11} {'tunnel Gbit/s':>14} {'ratio':>6} {'target':>7} "
          f"{'raw RTT us':>11} {'tunnel RTT us':>14} {'added us':>9} {'a1 CPU s/GB':>12} "
          f"{'far CPU s/GB':>13}")
    for name, raw, tun, ratio, raw_rtt, tun_rtt, near, far in rows:
        print(f"{name:8} {raw:11.2f} {tun:14.2f} {ratio:6.2f} {targets[name]:7.2f} "
              f"{raw_rtt:11.0f} {tun_rtt:14.0f} {tun_rtt - raw_rtt:9.0f} {near:12.3f} "
              f"{far:13.3f}")
    print(f"4 MiB on a new connection a1 -> a2: straight {raw_ms:.1f} ms, tunnel {tun_ms:.1f} ms, "
          f"ratio {xfer_ratio:.2f} (target <= 1.5; median of {len(pairs)} alternate pairs)")
    for i, label, first in ((0, "straight", raw_first), (2, "tunnel", tun_first)):
        ms = sorted(p[i] * 1e3 for p in pairs)
        print(f"  {label:8} ms: min {ms[0]:.1f}, p25 {ms[len(ms) // 4]:.1f}, "
              f"p75 {ms[3 * len(ms) // 4]:.1f}, max {ms[-1]:.1f}; first byte after "
              f"{first:.2f} (median)")
    print("added RTT target <= 150 us (direct)")
    print("peers:", ", ".join(f"{p['node']}={p['path']}" for p in paths))
    print("targets met" if ok else "targets NOT met")
    if args.json:
        emit("tunnel", {**{f"{row[0]} tunnel/raw": row[3] for row in rows},
                        "4 MiB new connection tunnel/straight time": r["xfer_4mib_ratio"]},
             {**{f"{row[0]} {k}": v for row in rows for k, v in
                 (("raw Gbit/s", row[1]), ("tunnel Gbit/s", row[2]),
                  ("added RTT us", row[5] - row[4]))},
              "4 MiB straight ms": raw_ms, "4 MiB tunnel ms": tun_ms},
             {"raw": "iperf3 -c, one stream, straight between the same namespaces"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
