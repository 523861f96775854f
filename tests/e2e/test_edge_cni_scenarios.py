"""Edge CNI (issue 17, item 3): what users do with real Pod IPs, end to end in the NAT lab.

Sites A and B sit behind NAT routers that drop inbound traffic; the relay and the cloud node
are on the "internet". Each node's Pods live in one network namespace of their own behind a
veth (one address per Pod; the node's side of the veth, ``10.244.N.1``, is a host address), so
a Pod IP is never an address of its node, and nothing routes one site's Pods from another.
Every agent runs the DNS, the proxy and the Edge CNI; the clients are dig, curl and socat.

- a StatefulSet-like headless Service ``db``: ``db-0`` on a1, ``db-1`` on b1, with
  hostname/subdomain: from site A the name ``db-1.db.ns.svc.cluster.local`` answers db-1's Pod
  IP, TCP (curl, from the host and from db-0's own Pod) and UDP (socat) reach it; db-0 is
  reached locally, never intercepted;
- a "Prometheus" on the cloud node scrapes ``:9100/metrics`` of an exporter Pod on each edge
  node, by Pod IP and by Pod DNS name (``a-b-c-d.monitoring.pod.cluster.local``), counted per
  peer on the cloud's ``/metrics``;
- a Pod IP that belongs to no Pod is not intercepted (the client gets "no route", the agent
  says nothing about it), and b1 refuses an address that a1 wrongly believes is b1's Pod,
  counted;
- db-2 moves from b1 to the cloud, then is deleted (the manifest rewritten): a1's rules follow
  within one sync, and the name answers from the new node in between;
- ``edgemesh cleanup`` after ``kill -9`` removes every rule the Edge CNI made.

The nodes have no ``podCIDRs`` here: every Pod IP is learnt from the EndpointSlices the files
source derives from the Pods, one steered /32 each (tests/e2e/test_edge_cni.py covers ranges).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap

import pytest
import yaml

from tests import netlab
from tests.e2e import meshlab
from tests.e2e.meshlab import metric
from tests.procs import ROOT, Proc, edgemesh_argv, wait_ready

pytestmark = pytest.mark.netns

SERVER_IP = "198.18.0.10"
SERVER = f"{SERVER_IP}:{meshlab.SERVER_PORT}"
ADMIN = "127.0.0.1:10557"
DNS = "169.254.96.16"
NODES = {"a1": "192.168.10.2", "b1": "192.168.20.2", "cloud": "198.18.0.20"}
POD_NET = {"a1": "10.244.1", "b1": "10.244.2", "cloud": "10.244.3"}
# pod name -> (node, IP); db-2 starts on b1 and moves to the cloud (test_a_pod_that_moves...)
PODS = {"db-0": ("a1", "10.244.1.5"), "db-1": ("b1", "10.244.2.5"),
        "db-2": ("b1", "10.244.2.7"), "exporter-a1": ("a1", "10.244.1.9"),
        "exporter-b1": ("b1", "10.244.2.9")}
DB2_MOVED = ("cloud", "10.244.3.7")
GHOST = "10.244.2.66"  # a1 alone believes it is a Pod of b1; a server does listen there
NO_POD = "10.244.2.77"  # no Pod, no server


# ---- manifests ------------------------------------------------------------------------------

def pod(name: str, namespace: str, app: str, node: str, ip: str, subdomain: str = "") -> dict:
    spec: dict = {"nodeName": node, "containers": [{"name": "c", "image": "x"}]}
    if subdomain:
        spec.update(hostname=name, subdomain=subdomain)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
            "spec": spec,
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def headless(name: str, namespace: str, ports: list[tuple[str, int, str]]) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": "None", "selector": {"app": name},
                     "ports": [{"name": n, "port": p, "protocol": proto}
                               for n, p, proto in ports]}}


def manifests(db2: tuple[str, str] | None) -> list[dict]:
    """The cluster every agent sees; ``db2`` is db-2's (node, IP), None once deleted."""
    docs: list[dict] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}
                        for n in ("ns", "monitoring")]
    docs += [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": n},
              "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}
             for n, ip in NODES.items()]
    docs.append(headless("db", "ns", [("tcp", 8080, "TCP"), ("udp", 7001, "UDP")]))
    docs.append(headless("node-exporter", "monitoring", [("metrics", 9100, "TCP")]))
    for name in ("db-0", "db-1"):
        docs.append(pod(name, "ns", "db", *PODS[name], subdomain="db"))
    if db2 is not None:
        docs.append(pod("db-2", "ns", "db", *db2, subdomain="db"))
    for name in ("exporter-a1", "exporter-b1"):
        docs.append(pod(name, "monitoring", "node-exporter", *PODS[name]))
    return docs


def ghost_slice() -> dict:
    """What only a1 reads: an endpoint that says GHOST is a Pod of b1 (a stale source)."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "ghost-1", "namespace": "ns",
                         "labels": {"kubernetes.io/service-name": "ghost"}},
            "addressType": "IPv4", "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [GHOST], "nodeName": "b1",
                           "targetRef": {"kind": "Pod", "namespace": "ns", "name": "ghost-0"}}]}


# ---- the Pods: one process per node serving every Pod address of that node ------------------

PODS_SERVER = textwrap.dedent("""
    import http.server, socket, sys, threading
    def http_pod(name, ip, port):
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/metrics":
                    body = f'up{{pod="{name}"}} 1\\n'.encode()
                else:
                    body = f"{name} saw {self.client_address[0]}".encode()
                self.send_response(200); self.send_header("Content-Length", str(len(body)))
                self.end_headers(); self.wfile.write(body)
            def log_message(self, *a): pass
        http.server.ThreadingHTTPServer((ip, port), H).serve_forever()
    def udp_pod(name, ip):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((ip, 7001))
        while True:
            data, peer = s.recvfrom(65535); s.sendto(name.encode() + b" got " + data, peer)
    for arg in sys.argv[1:]:
        name, ip = arg.split("=")
        for port in (8080, 9100):
            threading.Thread(target=http_pod, args=(name, ip, port)).start()
        threading.Thread(target=udp_pod, args=(name, ip)).start()
""")


CONNECT = textwrap.dedent("""
    import errno, socket, sys
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10); print("connected")
    except OSError as e:
        print(errno.errorcode.get(e.errno, repr(e)))
""")


def resolv_dir(ns: netlab.Netns) -> str:
    return f"/etc/netns/{ns.name}"


class Env:
    def __init__(self, lab: netlab.Lab, tmp: str) -> None:
        self.lab, self.tmp = lab, tmp
        inet = lab.switch("inet", "198.18.0.254/24")
        self.srv = lab.host("srv", inet, f"{SERVER_IP}/24")
        site_a = lab.site("a", inet, wan="198.18.0.1/24", lan="192.168.10.1/24")
        site_b = lab.site("b", inet, wan="198.18.0.2/24", lan="192.168.20.1/24")
        self.nodes = {
            "a1": lab.host("a1", site_a.lan, f"{NODES['a1']}/24", gw="192.168.10.1"),
            "b1": lab.host("b1", site_b.lan, f"{NODES['b1']}/24", gw="192.168.20.1"),
            "cloud": lab.host("cloud", inet, f"{NODES['cloud']}/24", gw="198.18.0.254")}
        served = {n: [f"{p}={ip}" for p, (node, ip) in PODS.items() if node == n]
                  for n in NODES}
        served["b1"].append(f"ghost-0={GHOST}")
        served["cloud"].append(f"db-2={DB2_MOVED[1]}")
        self.pods = {n: self._pod_netns(n, [a.split("=")[1] for a in served[n]])
                     for n in NODES}
        for n, pods in served.items():
            self.pods[n].popen(["python3", "-c", PODS_SERVER, *pods])
        for n in ("a1", "cloud"):
            os.makedirs(resolv_dir(self.nodes[n]), exist_ok=True)
            meshlab.write(resolv_dir(self.nodes[n]), "resolv.conf",
                          f"nameserver {DNS}\nsearch ns.svc.cluster.local svc.cluster.local "
                          "cluster.local\noptions ndots:5\n")
        for d in ("m", "a1-only"):
            os.mkdir(os.path.join(tmp, d))
        self.psk = meshlab.write(tmp, "psk", "correct horse battery staple, cni scenarios")
        self.write_cluster(PODS["db-2"])
        meshlab.write(tmp, "a1-only/ghost.yaml", yaml.safe_dump(ghost_slice()))
        self.config = meshlab.write(tmp, "config.yaml", yaml.safe_dump({
            "modules": {"edgeCNI": {"enable": True},
                        "edgeDNS": {"cacheDNS": {"upstreamServers": []}},
                        "edgeTunnel": {"holePunching": False}}}))
        self.server = meshlab.server(self.srv, tmp, self.psk, "127.0.0.1:10558")
        self.procs = {n: self.agent(n) for n in NODES}
        for n in NODES:
            wait_ready(self.procs[n], ADMIN, self.nodes[n], timeout=60)
        for n, pods in served.items():
            self.pods[n].wait_listening(*(f"{a.split('=')[1]}:8080" for a in pods))

    def _pod_netns(self, node: str, ips: list[str]) -> netlab.Netns:
        """The namespace of ``node``'s Pods (one address each), behind a veth whose node side
        is .1/24."""
        ns = self.lab.netns(f"{node}pods")
        host = self.nodes[node]
        netlab.sh("ip", "link", "add", "name", "eth0", "netns", ns.name, "type", "veth",
                  "peer", "name", "veth-pods", "netns", host.name)
        host.run("ip", "addr", "add", f"{POD_NET[node]}.1/24", "dev", "veth-pods")
        host.run("ip", "link", "set", "veth-pods", "up")
        ns.run("ip", "link", "set", "eth0", "up")
        for ip in ips:
            ns.run("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        ns.run("ip", "route", "add", "default", "via", f"{POD_NET[node]}.1")
        return ns

    def write_cluster(self, db2: tuple[str, str] | None) -> None:
        meshlab.write(self.tmp, "m/cluster.yaml", yaml.safe_dump_all(manifests(db2)))

    def agent(self, node: str) -> Proc:
        dirs = [os.path.join(self.tmp, "m")]
        if node == "a1":
            dirs.append(os.path.join(self.tmp, "a1-only"))
        return Proc(["agent", "--config", self.config, *meshlab.mesh_args(
            node, SERVER, self.psk, os.path.join(self.tmp, f"state-{node}"), ADMIN, dirs)],
            ns=self.nodes[node])

    def run(self, node: str, *argv: str, timeout: float = 40) -> subprocess.CompletedProcess[str]:
        return self.nodes[node].run(*argv, check=False, timeout=timeout)

    def curl(self, node: str, url: str, max_time: int = 20) -> str:
        return self.run(node, "curl", "-sS", "--max-time", str(max_time), url).stdout

    def dig(self, node: str, name: str) -> list[str]:
        return self.run(node, "dig", "+short", "+tries=2", "+time=3", f"@{DNS}",
                        name).stdout.split()

    def metrics(self, node: str) -> str:
        return self.run(node, "curl", "-s", f"http://{ADMIN}/metrics").stdout

    def rules(self, node: str) -> str:
        return "".join(self.run(node, "iptables-save", "-t", t).stdout
                       for t in ("nat", "mangle"))

    def close(self) -> None:
        for p in [*self.procs.values(), self.server]:
            p.stop()
        for n in ("a1", "cloud"):
            shutil.rmtree(resolv_dir(self.nodes[n]), ignore_errors=True)


@pytest.fixture(scope="module")
def env(module_lab: tuple[netlab.Lab, str]):
    if not (shutil.which("dig") and shutil.which("socat")):
        pytest.skip("needs dig and socat")
    e = Env(*module_lab)
    yield e
    e.close()


def steered(rules: str, ip: str) -> bool:
    return f"{ip}/32" in rules


# ---- the StatefulSet ------------------------------------------------------------------------

def test_a_statefulset_peer_on_another_site_by_name_tcp_and_udp(env: Env) -> None:
    db0, db1 = PODS["db-0"][1], PODS["db-1"][1]
    assert env.dig("a1", "db-1.db.ns.svc.cluster.local") == [db1]
    assert env.dig("a1", "db-0.db.ns.svc.cluster.local") == [db0]
    assert sorted(env.dig("a1", "db.ns.svc.cluster.local")) == sorted(
        [db0, db1, PODS["db-2"][1]])
    # TCP by name (resolv.conf → the agent), carried through the relay to b1, which dials
    # its Pod from its side of the veth
    netlab.wait_for(lambda: env.curl("a1", "http://db-1.db:8080/").startswith("db-1"),
                    timeout=30, what="db-1 answers by name from site A")
    assert env.curl("a1", "http://db-1.db.ns.svc.cluster.local:8080/") == "db-1 saw 10.244.2.1"
    # Pod to Pod: db-0's own namespace (routed through a1) reaches db-1 by IP
    out = env.pods["a1"].run("curl", "-sS", "--max-time", "20", f"http://{db1}:8080/",
                             check=False, timeout=40)
    assert out.stdout == "db-1 saw 10.244.2.1", out.stderr
    # UDP: one datagram in, one out, boundaries kept (socat -T: idle timeout)
    got = env.run("a1", "sh", "-c", "printf hello-udp | socat -t 3 - UDP:db-1.db:7001").stdout
    assert got == "db-1 got hello-udp"
    # db-0 is local: answered by the kernel's route, never steered, from the node and from
    # db-0's own namespace
    assert env.curl("a1", "http://db-0.db:8080/") == "db-0 saw 10.244.1.1"
    assert env.pods["a1"].run("curl", "-sS", "--max-time", "10", f"http://{db0}:8080/",
                              check=False).stdout == f"db-0 saw {db0}"
    rules = env.rules("a1")
    assert steered(rules, db1) and not steered(rules, db0)
    text = env.metrics("a1")
    assert metric(text, "edgemesh_cni_pod_connections_total", node="b1") >= 3
    assert metric(text, "edgemesh_cni_pod_udp_sessions_total", node="b1") >= 1
    assert metric(text, "edgemesh_cni_pod_datagrams_total", node="b1") >= 1
    assert metric(text, "edgemesh_cni_pod_connections_total", node="a1") == 0
    # edgemesh status: the Pod networks a1 carries, and what went to each peer
    status = env.run("a1", "env", f"PYTHONPATH={ROOT}", *edgemesh_argv(), "status",
                     "--json", timeout=60)
    cni = json.loads(status.stdout)["edgeCNI"]
    assert f"{db1}/32" in cni["steered"]["tcp"] and f"{db0}/32" not in cni["steered"]["tcp"]
    assert cni["peers"]["b1"]["tcp_connections"] >= 3 and cni["peers"]["b1"]["datagrams"] >= 1
    text = env.run("a1", "env", f"PYTHONPATH={ROOT}", *edgemesh_argv(), "status").stdout
    assert any(line.split() == [f"{db1}/32", "TCP/UDP"] for line in text.splitlines()), text


# ---- Prometheus in the cloud ----------------------------------------------------------------

def test_prometheus_in_the_cloud_scrapes_exporters_on_each_edge_node(env: Env) -> None:
    before = {n: metric(env.metrics("cloud"), "edgemesh_cni_pod_connections_total", node=n)
              for n in ("a1", "b1")}
    for name in ("exporter-a1", "exporter-b1"):
        ip = PODS[name][1]
        url = f"http://{ip}:9100/metrics"
        netlab.wait_for(lambda u=url: env.curl("cloud", u).startswith("up{"), timeout=30,
                        what=f"{name} scraped by IP")
        assert env.curl("cloud", f"http://{ip}:9100/metrics") == f'up{{pod="{name}"}} 1\n'
        dashed = f"{ip.replace('.', '-')}.monitoring.pod.cluster.local"
        assert env.dig("cloud", dashed) == [ip]
        assert env.curl("cloud", f"http://{dashed}:9100/metrics") == \
            f'up{{pod="{name}"}} 1\n'
    text = env.metrics("cloud")
    for n in ("a1", "b1"):  # the scrapes, counted per peer node
        assert metric(text, "edgemesh_cni_pod_connections_total", node=n) >= before[n] + 3


# ---- what is not a Pod ----------------------------------------------------------------------

def test_an_address_of_no_pod_is_left_to_the_kernel(env: Env) -> None:
    r = env.run("a1", "curl", "-sS", "--max-time", "10", f"http://{NO_POD}:8080/")
    assert r.returncode == 7, (r.returncode, r.stderr)  # "couldn't connect", not a timeout
    # site A's router has no route there: the kernel says so at once, nobody intercepted it
    r = env.run("a1", "python3", "-c", CONNECT, NO_POD, "8080")
    assert r.stdout.strip() in ("EHOSTUNREACH", "ENETUNREACH"), r.stdout + r.stderr
    assert not steered(env.rules("a1"), NO_POD)
    assert NO_POD not in env.procs["a1"].log()


def test_the_remote_agent_refuses_what_is_not_its_pod(env: Env) -> None:
    assert steered(env.rules("a1"), GHOST)  # a1 believes its stale source...
    refused = "edgemesh_tunnel_streams_refused_total"
    before = metric(env.metrics("b1"), refused, reason="not_local_endpoint")
    out = env.curl("a1", f"http://{GHOST}:8080/", max_time=10)
    assert "ghost" not in out  # ...b1 does not: the server listening there never sees it
    netlab.wait_for(lambda: metric(env.metrics("b1"), refused, reason="not_local_endpoint")
                    >= before + 1, timeout=10, what="b1 counts the refusal")


# ---- Pods that move and go ------------------------------------------------------------------

def test_a_pod_that_moves_then_goes_takes_its_interception_along(env: Env) -> None:
    old, new = PODS["db-2"][1], DB2_MOVED[1]
    netlab.wait_for(lambda: env.curl("a1", "http://db-2.db:8080/").startswith("db-2"),
                    timeout=30, what="db-2 answers on b1")
    assert env.curl("a1", f"http://{old}:8080/") == "db-2 saw 10.244.2.1"
    env.write_cluster(DB2_MOVED)  # rescheduled on the cloud node, a new IP there
    netlab.wait_for(lambda: (lambda r: steered(r, new) and not steered(r, old))(
        env.rules("a1")), timeout=15, what="a1's rules follow db-2 to the cloud")
    assert env.dig("a1", "db-2.db.ns.svc.cluster.local") == [new]
    netlab.wait_for(lambda: env.curl("a1", "http://db-2.db:8080/") == "db-2 saw 10.244.3.1",
                    timeout=30, what="db-2 answers from the cloud")
    assert env.run("a1", "curl", "-sS", "--max-time", "5",
                   f"http://{old}:8080/").returncode != 0  # the old address is gone
    env.write_cluster(None)  # deleted
    netlab.wait_for(lambda: not steered(env.rules("a1"), new), timeout=15,
                    what="a1's rule for db-2 removed")
    assert env.dig("a1", "db-2.db.ns.svc.cluster.local") == []


# ---- cleanup --------------------------------------------------------------------------------

def test_cleanup_after_kill9_removes_the_edge_cni_rules(env: Env) -> None:
    db1 = PODS["db-1"][1]
    assert steered(env.rules("a1"), db1)
    env.procs["a1"].stop(signal.SIGKILL)
    assert steered(env.rules("a1"), db1)  # nobody cleaned up after kill -9...
    r = env.run("a1", "env", f"PYTHONPATH={ROOT}", *edgemesh_argv(), "cleanup", "--config",
                env.config, timeout=60)
    assert r.returncode == 0, r.stderr
    rules = env.rules("a1")
    assert "EDGEMESH" not in rules and "10.244.2." not in rules  # ...until edgemesh cleanup
    assert "10.244.1.1" in env.run("a1", "ip", "-4", "addr").stdout  # the node's own: kept
    for name, proc in env.procs.items():  # nothing alarming all along
        assert "Traceback" not in proc.log(), f"{name}:\n{proc.log()}"
