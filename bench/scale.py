"""Scale: N Services x M endpoints through the files and kube sources; 10k/1k growth ratios.

Generates a cluster of N Services (ClusterIP, one TCP port) x M endpoints in 50 namespaces on
100 nodes, with EndpointSlices split at 100 endpoints as the API splits them, one Pod per
endpoint and one DestinationRule per ten Services, and runs one agent per size and source:

- ``files``: the objects as ``kubectl get -o json`` Lists, one file per namespace, in a
  manifests directory (``--format yaml`` writes YAML instead);
- ``kube``: the same objects served by ``tests/kubeapi.py`` (list+watch over HTTP) in a child
  process; the agent lists them (pages of 500) and watches.

As root, the whole bench runs in a network namespace of its own (``unshare(CLONE_NEWNET)``), so
the agent installs its iptables rules there and a change is "carried" once a TCP connect to the
service address from the namespace reaches the endpoint; ``--no-iptables`` (the default when not
root) runs the agent unprivileged, where "carried" is not measured.

Figures per run: time to ready (``/readyz`` 200, from the agent's start), the agent's CPU
seconds until then (the figure to compare on a busy machine, where waiting for a core inflates
the first), INFO log lines written until then; for one added Service, one changed Service
(new cluster IP) and one deleted Service: time from the write (file renamed into place /
object stored in the API) until the agent's DNS answers it (a UDP query every 5 ms) and until
the proxy carries it; RSS and open descriptors once settled; idle CPU over ``--idle`` seconds
(default 60); iptables apply time (``edgemesh_proxy_iptables_sync_seconds``: the first sync,
and the mean of the later ones); time to exit on SIGTERM. The 10k/1k ratio of each figure is
printed (linear growth = 10).

    .venv/bin/python -m bench.scale [--sizes 100,1000,10000] [--endpoints 5]
        [--sources files,kube] [--idle 60] [--no-iptables] [--no-proxy] [--format json|yaml]
        [--json]

``--no-proxy`` runs the agent without its proxy module: the figures of the metadata sources, the
store and DNS alone (the proxy's listeners and rules are measured by the default run).

Reference, kube-proxy's published figures (iptables mode, the same job at cluster scale):

- KEP-3453 (minimize iptables-restore, beta in 1.27): in the 5,000-node scalability job,
  ``network_programming_duration_seconds`` p50 fell from about 27 s to about 13 s with partial
  restores, and to about 5 s with ``--iptables-min-sync-period 1s``; p90/p99 stay dominated by
  full resyncs, whose input is O(Services + endpoints).
- The Kubernetes blog "NFTables mode for kube-proxy" (2025-02-28, KEP-3866): iptables updates
  remain O(n) in the number of Services even after KEP-3453; nftables updates are O(changed),
  and first-packet latency at 5,000 / 10,000 / 30,000 Services is flat with nftables where
  iptables grows linearly.
- The issue (#16) quotes "kube-proxy syncs this size (10k Services) in about a second".
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.report import emit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMESPACES, NODES, SLICE_MAX = 50, 100, 100
ZONE = "cluster.local"
PROBE_NS = "ns-0"
PROBE_IPS = ("10.111.255.1", "10.111.255.2")
CLONE_NEWNET = 0x40000000
Obj = dict[str, Any]


# ---- the cluster --------------------------------------------------------------------------------

def _ip(base: str, offset: int) -> str:
    a, b, c, d = (int(x) for x in base.split("."))
    n = (a << 24 | b << 16 | c << 8 | d) + offset
    return ".".join(str(n >> s & 255) for s in (24, 16, 8, 0))


def service(name: str, ns: str, ip: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                     "selector": {"app": name},
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80,
                                "targetPort": 8080}]}}


def endpoint_slices(name: str, ns: str, endpoints: list[tuple[str, str, str]],
                    port: int = 8080) -> list[Obj]:
    """Slices of at most 100 endpoints ((ip, node, pod name)), as the controller cuts them."""
    out = []
    for k in range(0, max(len(endpoints), 1), SLICE_MAX):
        out.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": f"{name}-{k // SLICE_MAX:05d}", "namespace": ns,
                                 "labels": {"kubernetes.io/service-name": name}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "protocol": "TCP", "port": port}],
                    "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                                   "nodeName": node,
                                   "targetRef": {"kind": "Pod", "namespace": ns, "name": pod}}
                                  for ip, node, pod in endpoints[k:k + SLICE_MAX]]})
    return out


def pod(name: str, ns: str, app: str, ip: str, node: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app:1",
                                                       "ports": [{"containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def destination_rule(name: str, ns: str) -> Obj:
    return {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"host": name, "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}}}


def generate(n: int, m: int) -> dict[str, list[Obj]]:
    """Every object of an n x m cluster, by API resource name."""
    out: dict[str, list[Obj]] = {r: [] for r in (
        "namespaces", "nodes", "services", "endpointslices", "pods", "destinationrules")}
    out["namespaces"] = [{"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": f"ns-{i}"}, "status": {"phase": "Active"}}
                         for i in range(NAMESPACES)]
    out["nodes"] = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"node-{i}"},
                     "status": {"addresses": [{"type": "InternalIP",
                                               "address": _ip("192.168.0.10", i)}]}}
                    for i in range(NODES)]
    for i in range(n):
        name, ns = f"svc-{i}", f"ns-{i % NAMESPACES}"
        out["services"].append(service(name, ns, _ip("10.96.0.16", i)))
        eps = [(_ip("10.160.0.0", i * m + j), f"node-{(i * m + j) % NODES}", f"{name}-{j}")
               for j in range(m)]
        out["endpointslices"] += endpoint_slices(name, ns, eps)
        out["pods"] += [pod(p, ns, name, ip, node) for ip, node, p in eps]
        if i % 10 == 0:
            out["destinationrules"].append(destination_rule(name, ns))
    return out


def write_manifests(cluster: dict[str, list[Obj]], directory: str, fmt: str) -> None:
    """One List per namespace (and one for the cluster-scoped objects), as kubectl dumps."""
    by_file: dict[str, list[Obj]] = {}
    for objs in cluster.values():
        for obj in objs:
            ns = obj["metadata"].get("namespace", "cluster")
            by_file.setdefault(ns, []).append(obj)
    for name, items in by_file.items():
        doc = {"apiVersion": "v1", "kind": "List", "items": items}
        path = os.path.join(directory, f"{name}.{fmt}")
        with open(path, "w", encoding="utf-8") as f:
            if fmt == "json":
                json.dump(doc, f, separators=(",", ":"))
            else:
                import yaml
                yaml.dump(doc, f, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper))


# ---- the kube API child -------------------------------------------------------------------------

def serve_kubeapi(path: str) -> None:
    """Child process: tests/kubeapi.py serving the objects in ``path``; then commands on stdin
    (one JSON line each: {"put": resource, "obj": ...} or {"delete": resource, "ns", "name"})."""
    from gevent import monkey
    monkey.patch_all()
    import gevent.fileobject

    from tests.kubeapi import KubeAPI
    with open(path, encoding="utf-8") as f:
        cluster = json.load(f)
    api = KubeAPI(history=100000)
    for res, objs in cluster.items():
        for obj in objs:
            api.put(res, obj)
    api.start()
    print(api.port, flush=True)
    stdin = gevent.fileobject.FileObjectPosix(sys.stdin.fileno(), "rb")
    for line in stdin:
        cmd = json.loads(line)
        if "put" in cmd:
            api.put(cmd["put"], cmd["obj"])
        else:
            api.delete(cmd["delete"], cmd["ns"], cmd["name"])
    api.stop()


class KubeSide:
    """The API child: started with the cluster, changed through its stdin."""

    def __init__(self, cluster: dict[str, list[Obj]], tmp: str) -> None:
        path = os.path.join(tmp, "cluster.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cluster, f)
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.scale", "--kubeapi-child",
                                      path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        assert self.proc.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def put(self, resource_: str, obj: Obj) -> None:
        self._send({"put": resource_, "obj": obj})

    def delete(self, resource_: str, ns: str, name: str) -> None:
        self._send({"delete": resource_, "ns": ns, "name": name})

    def _send(self, cmd: Obj) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


class FilesSide:
    """Changes as a user makes them: one file per probe object, renamed into place."""

    def __init__(self, directory: str) -> None:
        self.dir = directory

    def put(self, _resource: str, obj: Obj) -> None:
        path = os.path.join(self.dir, f"probe-{obj['kind']}-{obj['metadata']['name']}.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(obj, f)
        os.rename(path + ".tmp", path)

    def delete(self, _resource: str, _ns: str, name: str) -> None:
        for entry in os.listdir(self.dir):
            if entry.startswith("probe-") and entry.endswith(f"-{name}.json"):
                os.unlink(os.path.join(self.dir, entry))


# ---- probes -------------------------------------------------------------------------------------

def dns_a(server: tuple[str, int], name: str, timeout: float = 0.2) -> tuple[int, list[str]]:
    """(rcode, A records) of ``name`` from ``server``; (-1, []) on no answer."""
    from dnslib import QTYPE, DNSRecord
    q = DNSRecord.question(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(q.pack(), server)
            reply = DNSRecord.parse(s.recv(4096))
        except OSError:
            return -1, []
    return reply.header.rcode, [str(r.rdata) for r in reply.rr if r.rtype == QTYPE.A]


def connects(ip: str, port: int, expect: bytes, timeout: float = 0.2) -> bool:
    """A TCP connect through ``ip``:``port`` reaches a backend answering ``expect``.

    The connect itself gets 20 ms (a DNATed one completes at once on this host): a SYN sent
    before the rule exists is lost and only retransmitted after 1 s, so waiting for it would
    measure the probe's timeout, not the proxy (every "carried" figure read ~220 ms so)."""
    try:
        with socket.create_connection((ip, port), timeout=0.02) as s:
            s.settimeout(timeout)
            return s.recv(64).startswith(expect)
    except OSError:
        return False


def wait_until(check: Any, limit: float = 30.0, step: float = 0.005) -> float:
    """Seconds until ``check()`` is true (measured from the call), or NaN after ``limit``."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if check():
            return time.monotonic() - start
        time.sleep(step)
    return float("nan")


class Backend:
    """A TCP server on 127.0.0.1 that greets every connection with ``text`` and closes."""

    def __init__(self, text: bytes) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.text = text
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.text)


# ---- one run ------------------------------------------------------------------------------------

@dataclass
class Figures:
    source: str
    services: int
    endpoints: int
    iptables: bool
    proxy: bool = True
    ready_s: float = float("nan")
    ready_cpu_s: float = float("nan")
    log_lines: int = 0
    add_dns_ms: float = float("nan")
    add_carried_ms: float = float("nan")
    change_dns_ms: float = float("nan")
    change_carried_ms: float = float("nan")
    endpoint_carried_ms: float = float("nan")
    delete_dns_ms: float = float("nan")
    delete_carried_ms: float = float("nan")
    rss_mb: float = float("nan")
    fds: int = 0
    idle_cpu_pct: float = float("nan")
    iptables_first_s: float = float("nan")
    iptables_change_s: float = float("nan")
    stop_s: float = float("nan")
    notes: list[str] = field(default_factory=list)


def proc_figures(pid: int) -> tuple[float, int, float]:
    """(RSS MB, open descriptors, CPU seconds so far) of ``pid``."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd")), cpu


def sync_metric(admin: str) -> tuple[float, int]:
    """(sum, count) of edgemesh_proxy_iptables_sync_seconds."""
    total, count = 0.0, 0
    try:
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("edgemesh_proxy_iptables_sync_seconds_sum"):
                    total = float(line.split()[-1])
                elif line.startswith("edgemesh_proxy_iptables_sync_seconds_count"):
                    count = int(float(line.split()[-1]))
    except OSError:
        pass
    return total, count


def ready(admin: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{admin}/readyz", timeout=1) as r:
            return r.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def run_one(args: argparse.Namespace, source: str, n: int, tmp: str) -> Figures:
    fig = Figures(source, n, args.endpoints, args.iptables, args.proxy)
    cluster = generate(n, args.endpoints)
    side: KubeSide | FilesSide
    where: list[str]
    if source == "files":
        mdir = os.path.join(tmp, "manifests")
        os.makedirs(mdir)
        write_manifests(cluster, mdir, args.format)
        side, where = FilesSide(mdir), ["--manifests", mdir]
    else:
        side = KubeSide(cluster, tmp)
        where = ["--master", side.url]
    del cluster
    admin, dns = f"127.0.0.1:{free_port()}", ("127.0.0.1", free_port())
    cfg = os.path.join(tmp, "agent.yaml")
    with open(cfg, "w", encoding="utf-8") as f:
        proxy = "" if args.proxy else ", edgeProxy: {enable: false}"
        f.write(f"modules: {{edgeTunnel: {{enable: false}}{proxy}}}\n"
                f"commonConfig: {{stateDir: {tmp}/state}}\n")
    argv = [sys.executable, "-m", "edgemesh", "agent", "--config", cfg, *where,
            "--admin", admin, "--dns-listen", f"{dns[0]}:{dns[1]}", "--node-name", "node-0",
            *([] if args.iptables else ["--no-iptables"])]
    log_path = os.path.join(tmp, "agent.log")
    started = time.monotonic()
    with open(log_path, "wb") as log:
        agent = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": ROOT})
    try:
        fig.ready_s = wait_until(lambda: agent.poll() is not None or ready(admin),
                                 limit=300, step=0.02)
        if agent.poll() is not None:
            raise SystemExit(f"agent exited ({agent.returncode}); log: {log_path}")
        fig.ready_s = time.monotonic() - started
        fig.ready_cpu_s = proc_figures(agent.pid)[2]
        with open(log_path, "rb") as f:
            fig.log_lines = sum(1 for line in f if line[:1] == b"I" and line[1:5].isdigit())
        time.sleep(1.0)  # the burst after ready (cache write, first resyncs) is not "a change"
        first = sync_metric(admin)
        fig.iptables_first_s = first[0] / first[1] if first[1] else float("nan")
        changes(args, side, fig, dns)
        after = sync_metric(admin)
        if after[1] > first[1]:
            fig.iptables_change_s = (after[0] - first[0]) / (after[1] - first[1])
        time.sleep(1.0)
        fig.rss_mb, fig.fds, cpu0 = proc_figures(agent.pid)
        t0 = time.monotonic()
        time.sleep(args.idle)
        cpu1 = proc_figures(agent.pid)[2]
        fig.idle_cpu_pct = 100 * (cpu1 - cpu0) / (time.monotonic() - t0)
        t0 = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
            fig.stop_s = time.monotonic() - t0
            if agent.returncode != 0:
                fig.notes.append(f"exit code {agent.returncode}")
        except subprocess.TimeoutExpired:
            fig.notes.append("did not stop within 30 s")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if isinstance(side, KubeSide):
            side.stop()
    return fig


def since(t0: float, check: Any, limit: float = 30.0) -> float:
    """Milliseconds from ``t0`` until ``check()`` holds; NaN if it does not within ``limit``."""
    waited = wait_until(check, limit)
    return waited if waited != waited else 1000 * (time.monotonic() - t0)


def changes(args: argparse.Namespace, side: KubeSide | FilesSide, fig: Figures,
            dns: tuple[str, int]) -> None:
    """Add a Service, change its IP, move its endpoint, delete it; time each to DNS/proxy."""
    a, b = Backend(b"A"), Backend(b"B")
    fqdn = f"probe.{PROBE_NS}.svc.{ZONE}"
    carried = args.iptables and args.proxy

    def slice_to(port: int) -> Obj:
        return endpoint_slices("probe", PROBE_NS, [("127.0.0.1", "node-0", "probe-0")], port)[0]

    side.put("endpointslices", slice_to(a.port))
    time.sleep(args.settle)
    t0 = time.monotonic()
    side.put("services", service("probe", PROBE_NS, PROBE_IPS[0]))
    fig.add_dns_ms = since(t0, lambda: dns_a(dns, fqdn)[1] == [PROBE_IPS[0]])
    if carried:
        fig.add_carried_ms = since(t0, lambda: connects(PROBE_IPS[0], 80, b"A"))
    time.sleep(args.settle)
    t0 = time.monotonic()
    side.put("services", service("probe", PROBE_NS, PROBE_IPS[1]))
    fig.change_dns_ms = since(t0, lambda: dns_a(dns, fqdn)[1] == [PROBE_IPS[1]])
    if carried:
        fig.change_carried_ms = since(t0, lambda: connects(PROBE_IPS[1], 80, b"A"))
        time.sleep(args.settle)
        t0 = time.monotonic()
        side.put("endpointslices", slice_to(b.port))
        fig.endpoint_carried_ms = since(t0, lambda: connects(PROBE_IPS[1], 80, b"B"))
    time.sleep(args.settle)
    t0 = time.monotonic()
    side.delete("services", PROBE_NS, "probe")
    fig.delete_dns_ms = since(t0, lambda: dns_a(dns, fqdn)[0] == 3)
    if carried:
        fig.delete_carried_ms = since(
            t0, lambda: not connects(PROBE_IPS[1], 80, b"B", timeout=0.05))
    side.delete("endpointslices", PROBE_NS, "probe-00000")


# ---- report -------------------------------------------------------------------------------------

ROWS = [("ready_s", "time to ready (s)", "{:.2f}"),
        ("ready_cpu_s", "CPU seconds until ready", "{:.2f}"),
        ("log_lines", "INFO lines until ready", "{}"),
        ("add_dns_ms", "added Service in DNS (ms)", "{:.0f}"),
        ("add_carried_ms", "added Service carried (ms)", "{:.0f}"),
        ("change_dns_ms", "changed Service in DNS (ms)", "{:.0f}"),
        ("change_carried_ms", "changed Service carried (ms)", "{:.0f}"),
        ("endpoint_carried_ms", "changed endpoint carried (ms)", "{:.0f}"),
        ("delete_dns_ms", "deleted Service NXDOMAIN (ms)", "{:.0f}"),
        ("delete_carried_ms", "deleted Service not carried (ms)", "{:.0f}"),
        ("rss_mb", "RSS (MB)", "{:.1f}"), ("fds", "open descriptors", "{}"),
        ("idle_cpu_pct", "idle CPU (% of a core)", "{:.2f}"),
        ("iptables_first_s", "iptables first sync (s)", "{:.3f}"),
        ("iptables_change_s", "iptables sync per change (s)", "{:.3f}"),
        ("stop_s", "stop on SIGTERM (s)", "{:.2f}")]


def _cell(fmt: str, value: float) -> str:
    return "-" if isinstance(value, float) and value != value else fmt.format(value)


def report(results: list[Figures]) -> None:
    for source in dict.fromkeys(r.source for r in results):
        runs = sorted((r for r in results if r.source == source), key=lambda r: r.services)
        mode = "iptables in a netns" if runs[0].iptables else "--no-iptables"
        mode += "" if runs[0].proxy else ", proxy disabled"
        print(f"\n{source} source, {runs[0].endpoints} endpoints per Service, {mode}")
        by_n = {r.services: r for r in runs}
        head = "".join(f"{n:>10,}" for n in by_n) + ("   10k/1k" if {1000, 10000} <= set(by_n)
                                                     else "")
        print(f"  {'':34}{head}")
        for key, label, fmt in ROWS:
            cells = "".join(f"{_cell(fmt, getattr(r, key)):>10}" for r in runs)
            if {1000, 10000} <= set(by_n):
                lo, hi = getattr(by_n[1000], key), getattr(by_n[10000], key)
                cells += f"{hi / lo:>9.1f}" if lo and lo == lo and hi == hi else f"{'-':>9}"
            print(f"  {label:34}{cells}")
        for r in runs:
            for note in r.notes:
                print(f"  note ({r.services:,}): {note}")


def growth(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per source, each time and size figure of the largest run over the smallest's."""
    out = {}
    for source in dict.fromkeys(r["source"] for r in rows):
        runs = sorted((r for r in rows if r["source"] == source), key=lambda r: r["services"])
        small, big = runs[0], runs[-1]
        if small is big:
            continue
        for k in ("ready_s", "rss_mb", "add_dns_ms", "stop_s"):
            if big.get(k) is not None and small.get(k):
                out[f"{source} {k} {big['services']}/{small['services']}"] = big[k] / small[k]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def enter_netns() -> None:
    """Move this process (and the children it starts) into a new network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise SystemExit(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def main() -> None:
    if sys.argv[1:2] == ["--kubeapi-child"]:
        serve_kubeapi(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000",
                        help="Service counts, comma-separated (add 30000 when asked)")
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--sources", default="files,kube")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU")
    parser.add_argument("--settle", type=float, default=1.5,
                        help="seconds between changes (longer than a files poll)")
    parser.add_argument("--no-iptables", dest="iptables", action="store_false",
                        default=os.geteuid() == 0)
    parser.add_argument("--no-proxy", dest="proxy", action="store_false",
                        help="disable the proxy module: the metadata and DNS side alone")
    parser.add_argument("--format", choices=("json", "yaml"), default="json")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.iptables:
        enter_netns()
    results = []
    for source in args.sources.split(","):
        for n in (int(x) for x in args.sizes.split(",")):
            with tempfile.TemporaryDirectory(prefix="edgemesh-scale-") as tmp:
                results.append(run_one(args, source, n, tmp))
            if not args.json:
                print(f"  {source} {n:,}: ready {results[-1].ready_s:.2f} s", file=sys.stderr)
    if args.json:
        rows = [{k: None if v != v else v for k, v in asdict(r).items()} for r in results]
        print(json.dumps(rows))
        emit("scale", growth(rows), {f"{r['source']} {r['services']} {k}": v for r in rows
                                     for k, v in r.items() if isinstance(v, float)},
             {"kube-proxy": "published figures, quoted in this module's docstring"})
    else:
        report(results)


if __name__ == "__main__":
    main()
