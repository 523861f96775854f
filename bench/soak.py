"""Soak: N concurrent proxied connections held through a ClusterIP and through the tunnel.

A netns lab: three hosts on one LAN (a relay server, agents a1 and b1, iptables in each
agent's namespace), an echo Pod on a1 and one on b1 (lo addresses). A gevent client in a1
opens N connections to a ClusterIP whose endpoint is local (the ClusterIP path), holds them
for ``--seconds`` while each sends a 18-byte line every ``--interval`` seconds and checks the
echo, then closes them all; then the same through a ClusterIP whose endpoint is on b1 (the
tunnel path). Sampled every 2 s: the agents' RSS and open descriptors. Printed per path:
connections, errors (failed connects, resets, short or wrong echoes, timeouts), exchanges and
their p50/p99, RSS and its slope after warm-up (MB/min, least squares), and the agents'
descriptors before, at peak and after the close.

    .venv/bin/python -m bench.soak [--conns 10000] [--seconds 600] [--interval 10]

``make soak`` runs the 10-minute version; tests/e2e/test_soak.py a short one in ``make test``.
The agents' and the client's RLIMIT_NOFILE are raised (inherited from this process) because
10,000 proxied connections need ~20,000 descriptors in the agent and 10,000 in the client.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field

import yaml

from tests import netlab
from tests.procs import Proc, wait_ready

ADMIN = "127.0.0.1:10581"
NODES = {"a1": "10.77.0.2", "b1": "10.77.0.3"}
SERVER_IP = "10.77.0.10"
PODS = {"a1": "172.17.0.2", "b1": "172.17.0.3"}
ECHO_PORT = 7000
PATHS = {"clusterip": ("10.96.3.1", "a1"), "tunnel": ("10.96.3.2", "b1")}
NOFILE = 1 << 17
FD_MARGIN = 16  # descriptors an agent may keep after the close (pools, a new peer socket)
SAMPLE_EVERY = 2.0
FD_RESERVE = 200  # an agent's own descriptors (listeners, netlink, pipes, logs)

ECHO = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import sys
    from gevent.server import StreamServer
    def echo(sock, addr):
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except OSError:
            pass
    StreamServer((sys.argv[1], int(sys.argv[2])), echo, backlog=4096).serve_forever()
""")

# Opens N connections (500 connects at a time), prints {"event": "open"}, holds them while
# each exchanges a line every INTERVAL s until HOLD s have passed, closes them, prints totals.
CLIENT = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import collections, json, random, socket, sys, time
    import gevent
    from gevent.pool import Pool
    ip, port, n, hold, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
        float(sys.argv[4]), float(sys.argv[5])
    errors = collections.Counter()
    socks = [None] * n
    lat = []
    def echo_once(s, msg):
        # None when msg came back whole, else what went wrong
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = s.recv(64)
            if not chunk:
                return "closed by the proxy"
            got += chunk
        return None if got == msg else "wrong echo"
    def open_one(i):
        try:  # open = connected and one line echoed: the whole path is up for it
            s = socket.create_connection((ip, port), timeout=30)
            fault = echo_once(s, b"%08d:%08d\\n" % (i, 0))
        except OSError as e:
            errors["open " + type(e).__name__] += 1
            return
        if fault:
            errors["open " + fault] += 1
            s.close()
        else:
            socks[i] = s
    t0 = time.monotonic()
    pool = Pool(500)
    for i in range(n):
        pool.spawn(open_one, i)
    pool.join()
    print(json.dumps({"event": "open", "seconds": time.monotonic() - t0,
                      "opened": sum(s is not None for s in socks)}), flush=True)
    end = time.monotonic() + hold
    def exchange(i):
        s = socks[i]
        gevent.sleep(random.uniform(0, interval))
        k = 1
        while time.monotonic() < end:
            t = time.perf_counter()
            try:
                fault = echo_once(s, b"%08d:%08d\\n" % (i, k))
            except OSError as e:
                fault = "exchange " + type(e).__name__
            if fault:
                errors[fault] += 1
                return
            lat.append(time.perf_counter() - t)
            k += 1
            gevent.sleep(max(0.0, min(interval, end - time.monotonic())))
    gevent.joinall([gevent.spawn(exchange, i) for i in range(n) if socks[i] is not None])
    for s in socks:
        if s is not None:
            s.close()
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else 0.0
    print(json.dumps({"event": "done", "errors": dict(errors), "exchanges": len(lat),
                      "p50_ms": q(0.5), "p99_ms": q(0.99)}), flush=True)
""")


@dataclass
class Sample:
    t: float
    rss_mb: dict[str, float]
    fds: dict[str, int]


@dataclass
class PathResult:
    path: str
    conns: int
    opened: int
    open_s: float
    hold_s: float
    errors: dict[str, int]
    exchanges: int
    p50_ms: float
    p99_ms: float
    fds_before: dict[str, int]
    fds_peak: dict[str, int]
    fds_after: dict[str, int]
    rss_open: dict[str, float]
    rss_end: dict[str, float]
    slope_mb_min: dict[str, float]
    samples: list[Sample] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values()) + (self.conns - self.opened)

    @property
    def fds_returned(self) -> bool:
        return all(self.fds_after[n] <= self.fds_before[n] + FD_MARGIN for n in self.fds_after)


def raise_nofile(limit: int = NOFILE) -> int:
    """Raise this process's descriptor limit, inherited by the agents, the echo servers and
    the client started afterwards, as far as allowed (the hard limit can only be raised with
    CAP_SYS_RESOURCE); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= limit:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(hard, limit)))
        return limit
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard


def capacity(path: str, nofile: int) -> int:
    """Connections the client's agent can carry within ``nofile`` descriptors: two per
    connection on both paths (ClusterIP: client and endpoint sockets; tunnel: the client
    socket the proxy holds and the tunnel's own duplicate of it, ``AttachedStream``)."""
    del path
    return (nofile - FD_RESERVE) // 2


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute (0 with < 3 points)."""
    if len(points) < 3:
        return 0.0
    xs, ys = zip(*points, strict=True)
    return statistics.linear_regression(xs, ys).slope * 60


def manifests() -> list[dict]:
    docs: list[dict] = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": n},
                         "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}
                        for n, ip in NODES.items()]
    for path, (ip, node) in PATHS.items():
        name = f"soak-{path}"
        docs += [{"apiVersion": "v1", "kind": "Service",
                  "metadata": {"name": name, "namespace": "default"},
                  "spec": {"clusterIP": ip, "ports": [{"name": "tcp", "port": ECHO_PORT,
                                                       "targetPort": ECHO_PORT}]}},
                 {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                  "metadata": {"name": f"{name}-1", "namespace": "default",
                               "labels": {"kubernetes.io/service-name": name}},
                  "addressType": "IPv4", "ports": [{"name": "tcp", "port": ECHO_PORT}],
                  "endpoints": [{"addresses": [PODS[node]], "nodeName": node}]}]
    return docs


class SoakLab:
    """The lab: a server and two agents on one LAN, an echo Pod per agent."""

    def __init__(self, lab: netlab.Lab, tmp: str, conns: int) -> None:
        self.nofile = raise_nofile()
        lan = lab.switch("lan", "10.77.0.254/24")
        srv = lab.host("srv", lan, f"{SERVER_IP}/24")
        self.ns = {n: lab.host(n, lan, f"{ip}/24") for n, ip in NODES.items()}
        for n, pod in PODS.items():
            self.ns[n].run("ip", "addr", "add", f"{pod}/32", "dev", "lo")
            self.ns[n].popen([sys.executable, "-c", ECHO, pod, str(ECHO_PORT)])
        mdir = os.path.join(tmp, "m")
        os.mkdir(mdir)
        with open(os.path.join(mdir, "all.yaml"), "w") as f:
            yaml.safe_dump_all(manifests(), f)
        psk = os.path.join(tmp, "psk")
        with open(psk, "w") as f:
            f.write("soak cluster secret, long enough to pass")
        cfg = os.path.join(tmp, "agent.yaml")
        with open(cfg, "w") as f:  # 10,000 tunnelled connections are 10,000 streams of a peer
            yaml.safe_dump({"modules": {
                "edgeDNS": {"enable": False},
                "edgeProxy": {"maxConnections": 2 * conns + 1000},
                "edgeTunnel": {"holePunching": False,
                               "maxStreamsPerPeer": 2 * conns + 1000}}}, f)
        self.procs = [Proc(["server", "--listen", f"0.0.0.0:{20004}", "--psk-file", psk,
                            "--state-dir", os.path.join(tmp, "s-srv"), "--admin", ""], ns=srv)]
        self.agents: dict[str, Proc] = {}
        for n in NODES:
            p = Proc(["agent", "--config", cfg, "--manifests", mdir, "--node-name", n,
                      "--server", f"{SERVER_IP}:20004", "--psk-file", psk, "--state-dir",
                      os.path.join(tmp, f"s-{n}"), "--admin", ADMIN], ns=self.ns[n])
            self.procs.append(p)
            self.agents[n] = p
        for n, p in self.agents.items():
            wait_ready(p, ADMIN, self.ns[n], timeout=60)
        for n, pod in PODS.items():
            self.ns[n].wait_listening(f"{pod}:{ECHO_PORT}")
        for path, (ip, _) in PATHS.items():  # the first connection of each path, untimed
            netlab.wait_for(lambda ip=ip: self.ns["a1"].run(
                sys.executable, "-c", CLIENT, ip, str(ECHO_PORT), "1", "0", "1",
                check=False, timeout=60).stdout.count('"errors": {}') == 1,
                timeout=60, interval=1, what=f"one connection through the {path} path")

    def close(self) -> None:
        for p in self.procs:
            p.stop()

    def sample(self, names: list[str], t0: float) -> Sample:
        pids = {n: self.agents[n].popen.pid for n in names}
        return Sample(time.monotonic() - t0, {n: rss_mb(p) for n, p in pids.items()},
                      {n: fd_count(p) for n, p in pids.items()})

    def soak(self, path: str, conns: int, seconds: float, interval: float) -> PathResult:
        ip, far = PATHS[path]
        names = ["a1"] if far == "a1" else ["a1", far]
        t0 = time.monotonic()
        before = self.sample(names, t0)
        client = self.ns["a1"].popen([sys.executable, "-c", CLIENT, ip, str(ECHO_PORT),
                                      str(conns), str(seconds), str(interval)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert client.stdout is not None
        opened = _event(client.stdout.readline(), "open")
        t_open = time.monotonic() - t0
        samples = [self.sample(names, t0)]
        while client.poll() is None:
            time.sleep(SAMPLE_EVERY)
            if client.poll() is None:
                samples.append(self.sample(names, t0))
        done = _event(client.stdout.readline(), "done")
        t_close = time.monotonic() - t0

        def settled() -> Sample | None:
            s = self.sample(names, t0)
            return s if all(s.fds[n] <= before.fds[n] + FD_MARGIN for n in names) else None
        try:
            after = netlab.wait_for(settled, timeout=20, interval=0.5, what="descriptors back")
        except TimeoutError:
            after = self.sample(names, t0)
        warm = t_open + min(30.0, (t_close - t_open) / 3)
        return PathResult(
            path=path, conns=conns, opened=opened["opened"], open_s=opened["seconds"],
            hold_s=t_close - t_open, errors=done["errors"], exchanges=done["exchanges"],
            p50_ms=done["p50_ms"], p99_ms=done["p99_ms"], fds_before=before.fds,
            fds_peak={n: max(s.fds[n] for s in samples) for n in names},
            fds_after=after.fds, rss_open=samples[0].rss_mb, rss_end=samples[-1].rss_mb,
            slope_mb_min={n: slope_per_minute([(s.t, s.rss_mb[n]) for s in samples
                                               if s.t >= warm]) for n in names},
            samples=samples)


def _event(line: bytes, name: str) -> dict:
    try:
        event = json.loads(line)
    except ValueError:
        raise RuntimeError(f"soak client: expected {name!r}, got {line[:500]!r}") from None
    if event.get("event") != name:
        raise RuntimeError(f"soak client: expected {name!r}, got {event}")
    return event


def table(results: list[PathResult]) -> str:
    head = (f"{'path':10} {'agent':5} {'conns':>6} {'open s':>7} {'held s':>7} {'errors':>6} "
            f"{'exchanges':>9} {'p50 ms':>7} {'p99 ms':>7} {'RSS MB open/end':>16} "
            f"{'slope MB/min':>12} {'fds before/peak/after':>22}")
    rows = [head]
    for r in results:
        for n in r.fds_before:
            rows.append(
                f"{r.path:10} {n:5} {r.opened:6} {r.open_s:7.1f} {r.hold_s:7.0f} "
                f"{r.error_count:6} {r.exchanges:9} {r.p50_ms:7.1f} {r.p99_ms:7.1f} "
                f"{r.rss_open[n]:7.1f}/{r.rss_end[n]:<8.1f} {r.slope_mb_min[n]:12.2f} "
                f"{r.fds_before[n]:>6}/{r.fds_peak[n]}/{r.fds_after[n]:<6}")
    for r in results:
        if r.errors:
            rows.append(f"{r.path} errors: {r.errors}")
    return "\n".join(rows)


def run(conns: int, seconds: float, interval: float,
        paths: tuple[str, ...] = ("clusterip", "tunnel")) -> list[PathResult]:
    with netlab.Lab() as lab, tempfile.TemporaryDirectory(prefix="em-soak-") as tmp:
        soak_lab = SoakLab(lab, tmp, conns)
        try:
            return [soak_lab.soak(p, min(conns, capacity(p, soak_lab.nofile)), seconds,
                                  interval) for p in paths]
        finally:
            soak_lab.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=600, help="hold time per path")
    parser.add_argument("--interval", type=float, default=10,
                        help="seconds between a connection's exchanges")
    parser.add_argument("--path", choices=sorted(PATHS), action="append",
                        help="only this path (repeatable); default both")
    args = parser.parse_args()
    reason = netlab.can_run()
    if reason:
        print(f"skipped: {reason}")
        return 0
    results = run(args.conns, args.seconds, args.interval,
                  tuple(args.path or ("clusterip", "tunnel")))
    print(table(results))
    for r in results:
        if r.conns < args.conns:
            print(f"{r.path}: {r.conns} connections, not {args.conns}: the descriptor limit "
                  f"here is {resource.getrlimit(resource.RLIMIT_NOFILE)[1]} (hard; raising it "
                  f"needs CAP_SYS_RESOURCE) and the agent holds two descriptors per connection")
    ok = all(r.error_count == 0 and r.fds_returned for r in results)
    print("0 errors, descriptors returned" if ok else "FAILED: errors or descriptors kept")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
