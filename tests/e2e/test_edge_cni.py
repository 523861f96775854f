"""Edge CNI (issue 17, item 1) end to end: a client on site A reaches, by Pod IP and at any
port, TCP and UDP, a Pod that lives on site B behind a NAT that drops inbound traffic; it is
steered to a1's transparent listener and carried through the relay to b1's agent, which
connects to its Pod. b1 refuses what is not one of its Pods (its own bridge address, a host on
its LAN that a lying manifest calls a Pod), counted.

Pods here are network namespaces of their own behind a veth (``10.244.2.1`` on b1 is the
bridge-like gateway, a host address), so the Pod IP is not an address of the node.
"""
from __future__ import annotations

import os
import textwrap

import pytest
import yaml

from tests import netlab
from tests.e2e import meshlab
from tests.e2e.meshlab import TCP_CLIENT, metric
from tests.procs import Proc, wait_ready

pytestmark = pytest.mark.netns

SERVER_IP = "198.18.0.10"
SERVER = f"{SERVER_IP}:{meshlab.SERVER_PORT}"
ADMIN = "127.0.0.1:10557"
NODES = {"a1": ("192.168.10.2", "10.244.1.0/24"), "b1": ("192.168.20.2", "10.244.2.0/24")}
POD_B = "10.244.2.5"  # in b1's podCIDR
POD_B_EXTRA = "10.9.0.7"  # a second address of the Pod, known from its EndpointSlice only
X1 = "192.168.20.9"  # a host on site B's LAN: no Pod


def manifests(extra_pod: str = "") -> list[dict]:
    docs: list[dict] = [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": n},
         "spec": {"podCIDRs": [cidr]},
         "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}
        for n, (ip, cidr) in NODES.items()]
    addresses = [POD_B_EXTRA] + ([extra_pod] if extra_pod else [])
    docs += [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "default"},
         "spec": {"clusterIP": "None", "ports": [{"name": "m", "port": 9100}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "db-1", "namespace": "default",
                      "labels": {"kubernetes.io/service-name": "db"}},
         "addressType": "IPv4", "ports": [{"name": "m", "port": 9100, "protocol": "TCP"}],
         "endpoints": [{"addresses": [ip], "nodeName": "b1",
                        "targetRef": {"kind": "Pod", "namespace": "default",
                                      "name": f"db-{i}"}}
                       for i, ip in enumerate(addresses)]}]
    return docs


SERVE = textwrap.dedent("""
    import http.server, sys
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"pod {sys.argv[1]} saw {self.client_address[0]}".encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), H).serve_forever()
""")


UDP_ECHO = textwrap.dedent("""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 5353))
    while True:
        data, peer = s.recvfrom(65535); s.sendto(b"echo " + data, peer)
""")
UDP_CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
    s.connect((sys.argv[1], 5353)); got = []
    for size in (1, 100, 1400, 8000, 3):
        for attempt in range(3):  # the first datagram may wait for the tunnel
            s.send(bytes([65 + size % 26]) * size)
            try:
                got.append(len(s.recv(65535))); break
            except TimeoutError:
                continue
    print(",".join(map(str, got)))
""")


class Env:
    def __init__(self, lab: netlab.Lab, tmp: str) -> None:
        self.lab, self.tmp = lab, tmp
        inet = lab.switch("inet", "198.18.0.254/24")
        self.srv = lab.host("srv", inet, f"{SERVER_IP}/24")
        site_a = lab.site("a", inet, wan="198.18.0.1/24", lan="192.168.10.1/24")
        site_b = lab.site("b", inet, wan="198.18.0.2/24", lan="192.168.20.1/24")
        self.a1 = lab.host("a1", site_a.lan, f"{NODES['a1'][0]}/24", gw="192.168.10.1")
        self.b1 = lab.host("b1", site_b.lan, f"{NODES['b1'][0]}/24", gw="192.168.20.1")
        self.x1 = lab.host("x1", site_b.lan, f"{X1}/24", gw="192.168.20.1")
        self.pod = lab.netns("b1pod")
        netlab.sh("ip", "link", "add", "name", "eth0", "netns", self.pod.name, "type", "veth",
                  "peer", "name", "veth-pod", "netns", self.b1.name)
        self.b1.run("ip", "addr", "add", "10.244.2.1/24", "dev", "veth-pod")
        self.b1.run("ip", "link", "set", "veth-pod", "up")
        self.b1.run("ip", "route", "add", f"{POD_B_EXTRA}/32", "via", POD_B)
        self.pod.run("ip", "link", "set", "lo", "up")
        self.pod.run("ip", "link", "set", "eth0", "up")
        self.pod.run("ip", "addr", "add", f"{POD_B}/24", "dev", "eth0")
        self.pod.run("ip", "addr", "add", f"{POD_B_EXTRA}/32", "dev", "lo")
        self.pod.run("ip", "route", "add", "default", "via", "10.244.2.1")
        for port in (9100, 8080):
            self.pod.popen(["python3", "-c", SERVE, POD_B, str(port)])
        self.pod.popen(["python3", "-c", UDP_ECHO])
        self.b1.popen(["python3", "-c", SERVE, "b1-host", "9200"])  # the node itself
        self.x1.popen(["python3", "-c", SERVE, "x1", "9100"])
        for d in ("m", "lie"):
            os.mkdir(os.path.join(tmp, d))
        self.psk = meshlab.write(tmp, "psk", "correct horse battery staple, cluster cni")
        common = meshlab.write(tmp, "m/all.yaml", "---\n" + yaml.safe_dump_all(manifests()))
        # a1 alone believes x1's address is a Pod of b1 (a lying or stale source)
        lie = meshlab.write(tmp, "lie/all.yaml", yaml.safe_dump_all(manifests(X1)))
        config = meshlab.write(tmp, "config.yaml", yaml.safe_dump({
            "modules": {"edgeDNS": {"enable": False}, "edgeCNI": {"enable": True},
                        "edgeTunnel": {"holePunching": False}}}))
        self.server = meshlab.server(self.srv, tmp, self.psk, "127.0.0.1:10558")
        self.procs = {}
        for name, ns, m in (("a1", self.a1, lie), ("b1", self.b1, common)):
            args = ["agent", "--config", config, *meshlab.mesh_args(
                name, SERVER, self.psk, os.path.join(tmp, f"state-{name}"), ADMIN,
                [os.path.dirname(m)])]
            self.procs[name] = Proc(args, ns=ns)
        for name, ns in (("a1", self.a1), ("b1", self.b1)):
            wait_ready(self.procs[name], ADMIN, ns, timeout=40)
        self.pod.wait_listening("0.0.0.0:9100", "0.0.0.0:8080")

    def curl(self, url: str) -> str:
        r = self.a1.run("curl", "-sS", "--max-time", "20", url, check=False, timeout=40)
        return r.stdout

    def metrics(self, ns: netlab.Netns) -> str:
        return ns.run("curl", "-s", f"http://{ADMIN}/metrics").stdout


@pytest.fixture(scope="module")
def env(module_lab: tuple[netlab.Lab, str]):
    e = Env(*module_lab)
    yield e
    for p in [*e.procs.values(), e.server]:
        p.stop()


def test_a_remote_pod_ip_behind_a_nat_answers_at_any_port(env: Env) -> None:
    # no route to b1's Pods from a1 but the default one, and the NAT drops inbound: only the
    # tunnel gets there
    netlab.wait_for(lambda: env.curl(f"http://{POD_B}:9100/").startswith("pod"),
                    timeout=20, what="the Pod IP answers through the tunnel")
    assert env.curl(f"http://{POD_B}:9100/metrics") == f"pod {POD_B} saw 10.244.2.1"
    assert env.curl(f"http://{POD_B}:8080/") == f"pod {POD_B} saw 10.244.2.1"  # any port
    assert env.curl(f"http://{POD_B_EXTRA}:9100/") == f"pod {POD_B} saw 10.244.2.1"
    out = env.a1.run("python3", "-c", TCP_CLIENT, POD_B, "9100", check=False).stdout
    assert "400" in out or "HTTP" in out  # raw TCP bytes both ways (a bad request's answer)
    assert metric(env.metrics(env.a1), "edgemesh_cni_pod_connections_total", node="b1") >= 4


def test_udp_to_a_remote_pod_ip_keeps_datagram_boundaries(env: Env) -> None:
    out = env.a1.run("python3", "-c", UDP_CLIENT, POD_B, timeout=60).stdout.strip()
    assert out == "6,105,1405,8005,8"  # each reply one datagram, "echo " + what was sent
    assert metric(env.metrics(env.a1), "edgemesh_cni_pod_udp_sessions_total", node="b1") >= 1


def test_the_remote_agent_refuses_what_is_not_its_pod(env: Env) -> None:
    before = metric(env.metrics(env.b1), "edgemesh_tunnel_streams_refused_total",
                    reason="not_local_endpoint")
    # b1's own bridge address is in its podCIDR, but is the host: never dialled
    assert "b1-host" not in env.curl("http://10.244.2.1:9200/")
    # a1 was told x1 is b1's Pod; b1 knows better
    assert "x1" not in env.curl(f"http://{X1}:9100/")
    after = metric(env.metrics(env.b1), "edgemesh_tunnel_streams_refused_total",
                   reason="not_local_endpoint")
    assert after >= before + 2
    # b1's own LAN reaches x1 directly: nothing of the Edge CNI in the way there
    assert env.b1.run("curl", "-sS", "--max-time", "10", f"http://{X1}:9100/").stdout == \
        f"pod x1 saw {NODES['b1'][0]}"
