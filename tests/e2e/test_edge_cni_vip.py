"""Edge CNI virtual addresses (issue 17 item 2) end to end, in the NAT lab: two plain-Docker
nodes behind NATs that drop inbound traffic, a relay, and on each node a Pod at the same IP,
``172.17.0.2`` behind a ``172.17.0.1/16`` bridge-like veth. Each node's DNS (dig) answers the
other node's Pod by a virtual address from ``meshCIDR``, curl by that name reaches the right Pod
through the tunnel, and each node's own Pod stays at its real IP. The legacy EdgeMesh flow: a
headless ``nginx-svc`` (port ``http-0`` 12345 → 80) with ``edgemesh.kubeedge.io/headless-proxy``
resolves to a balanced VIP and ``curl http://nginx-svc.default.svc.cluster.local:12345``
answers; without the annotation the Kubernetes answer (the Pod's address, no port mapping).
A cloud node ``c1`` (no Docker bridge) is the "Prometheus" (issue 17 item 3): it scrapes the
exporter on each edge node, both at ``172.17.0.2:9100``, by their Pod DNS names, which its DNS
answers with two different VIPs.
"""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import textwrap

import pytest
import yaml

from edgemesh.proxy.meshcidr import Allocator
from tests import netlab
from tests.e2e import meshlab
from tests.e2e.meshlab import metric
from tests.procs import Proc, edgemesh_argv, wait_ready

pytestmark = pytest.mark.netns

SERVER_IP = "198.18.0.10"
SERVER = f"{SERVER_IP}:{meshlab.SERVER_PORT}"
ADMIN = "127.0.0.1:10557"
NODES = {"a1": "192.168.10.2", "b1": "192.168.20.2", "c1": "198.18.0.20"}
EDGE = ("a1", "b1")  # the nodes with a Pod at POD
POD = "172.17.0.2"  # on both nodes
MESH = "100.127.0.0/16"
Z = "default.svc.cluster.local"


def endpoint(node: str, hostname: str = "") -> dict:
    out = {"addresses": [POD], "nodeName": node,
           "targetRef": {"kind": "Pod", "namespace": "default", "name": f"pod-{node}"}}
    return {**out, "hostname": hostname} if hostname else out


def headless(name: str, port: int, target: int, port_name: str, eps: list[dict],
             annotations: dict[str, str] | None = None, protocol: str = "TCP") -> list[dict]:
    meta: dict = {"name": name, "namespace": "default"}
    if annotations:
        meta["annotations"] = annotations
    return [{"apiVersion": "v1", "kind": "Service", "metadata": meta,
             "spec": {"clusterIP": "None", "ports": [
                 {"name": port_name, "port": port, "targetPort": target,
                  "protocol": protocol}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": f"{name}-1", "namespace": "default",
                          "labels": {"kubernetes.io/service-name": name}},
             "addressType": "IPv4",
             "ports": [{"name": port_name, "port": target, "protocol": protocol}],
             "endpoints": eps}]


def manifests() -> list[dict]:
    docs = meshlab.nodes(NODES)
    docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
    docs += headless("db", 80, 80, "http", [endpoint("a1", "db-0"), endpoint("b1", "db-1")])
    docs += headless("nginx-svc", 12345, 80, "http-0", [endpoint("b1")],
                     {"edgemesh.kubeedge.io/headless-proxy": "true"})
    docs += headless("nginx-plain", 12345, 80, "http-0", [endpoint("b1")])
    docs += headless("node-exporter", 9100, 9100, "metrics",
                     [endpoint("a1", "exp-a1"), endpoint("b1", "exp-b1")])
    return docs


SERVE = textwrap.dedent("""
    import http.server, socket, sys, threading
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"pod {sys.argv[1]}".encode()
            if self.server.server_port == 9100:  # the node exporter
                body = f'node_exporter_up{{node="{sys.argv[1]}"}} 1\\n'.encode()
                if self.path != "/metrics":
                    self.send_error(404); return
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    def echo():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 5353))
        while True:
            data, peer = s.recvfrom(65535); s.sendto(f"{sys.argv[1]} ".encode() + data, peer)
    threading.Thread(target=echo, daemon=True).start()
    exporter = http.server.ThreadingHTTPServer(("0.0.0.0", 9100), H)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    http.server.ThreadingHTTPServer(("0.0.0.0", 80), H).serve_forever()
""")
UDP_ONCE = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
    s.connect((sys.argv[1], 5353))
    for attempt in range(5):  # the first datagram may wait for the tunnel
        s.send(b"ping")
        try:
            print(s.recv(65535).decode()); break
        except TimeoutError:
            continue
""")


class Env:
    def __init__(self, lab: netlab.Lab, tmp: str) -> None:
        self.lab, self.tmp = lab, tmp
        inet = lab.switch("inet", "198.18.0.254/24")
        self.srv = lab.host("srv", inet, f"{SERVER_IP}/24")
        site_a = lab.site("a", inet, wan="198.18.0.1/24", lan="192.168.10.1/24")
        site_b = lab.site("b", inet, wan="198.18.0.2/24", lan="192.168.20.1/24")
        self.ns = {"a1": lab.host("a1", site_a.lan, f"{NODES['a1']}/24", gw="192.168.10.1"),
                   "b1": lab.host("b1", site_b.lan, f"{NODES['b1']}/24", gw="192.168.20.1"),
                   # the cloud node: on the internet, no Docker bridge, no Pod
                   "c1": lab.host("c1", inet, f"{NODES['c1']}/24", gw="198.18.0.254")}
        for name in EDGE:
            self.pod(name, self.ns[name])
        self.psk = meshlab.write(tmp, "psk", "correct horse battery staple, cluster vip")
        os.mkdir(os.path.join(tmp, "m"))
        meshlab.write(tmp, "m/all.yaml", yaml.safe_dump_all(manifests()))
        config = meshlab.write(tmp, "config.yaml", yaml.safe_dump({
            "modules": {"edgeDNS": {"enable": True, "listenAddress": "127.0.0.1",
                                    "listenPort": 1053,
                                    "cacheDNS": {"upstreamServers": ["127.0.0.1:9"]}},
                        "edgeCNI": {"enable": True, "meshCIDR": MESH},
                        "edgeTunnel": {"holePunching": False}}}))
        self.server = meshlab.server(self.srv, tmp, self.psk, "127.0.0.1:10558")
        self.procs = {}
        for name, ns in self.ns.items():
            args = ["agent", "--config", config, *meshlab.mesh_args(
                name, SERVER, self.psk, os.path.join(tmp, f"state-{name}"), ADMIN,
                [os.path.join(tmp, "m")])]
            self.procs[name] = Proc(args, ns=ns)
        for name, ns in self.ns.items():
            wait_ready(self.procs[name], ADMIN, ns, timeout=40)

    def pod(self, name: str, node: netlab.Netns) -> None:
        """A Pod at 172.17.0.2 behind node's 172.17.0.1/16 (plain Docker's addresses)."""
        pod = self.lab.netns(f"{name}pod")
        netlab.sh("ip", "link", "add", "name", "eth0", "netns", pod.name, "type", "veth",
                  "peer", "name", "veth-pod", "netns", node.name)
        node.run("ip", "addr", "add", "172.17.0.1/16", "dev", "veth-pod")
        node.run("ip", "link", "set", "veth-pod", "up")
        pod.run("ip", "link", "set", "lo", "up")
        pod.run("ip", "link", "set", "eth0", "up")
        pod.run("ip", "addr", "add", f"{POD}/16", "dev", "eth0")
        pod.run("ip", "route", "add", "default", "via", "172.17.0.1")
        pod.popen(["python3", "-c", SERVE, name])
        pod.wait_listening("0.0.0.0:80")
        pod.wait_listening("0.0.0.0:9100")

    def dig(self, node: str, name: str, qtype: str = "A") -> list[str]:
        out = self.ns[node].run("dig", "+short", "+time=2", "+tries=2", "-p", "1053",
                                "@127.0.0.1", name, qtype, check=False).stdout
        return sorted(line for line in out.split() if line)

    def curl(self, node: str, name: str, port: int, ip: str, path: str = "/") -> str:
        """curl ``http://name:port/path`` at the address DNS gave (``--resolve``)."""
        r = self.ns[node].run("curl", "-sS", "--max-time", "10", "--resolve",
                              f"{name}:{port}:{ip}", f"http://{name}:{port}{path}",
                              check=False, timeout=30)
        return r.stdout

    def wait_curl(self, node: str, name: str, port: int, ip: str, expect: str) -> None:
        netlab.wait_for(lambda: self.curl(node, name, port, ip) == expect, timeout=20,
                        what=f"curl {name}:{port} at {ip} from {node} answers {expect!r}")

    def vip(self, node: str, name: str) -> str:
        """The address ``name`` resolves to on ``node``, once it is a virtual one."""
        def mesh() -> bool:
            got = self.dig(node, name)
            return len(got) == 1 and ipaddress.ip_address(got[0]) in ipaddress.ip_network(MESH)
        netlab.wait_for(mesh, timeout=20, what=f"{name} answered by a VIP on {node}")
        return self.dig(node, name)[0]


@pytest.fixture(scope="module")
def env(module_lab: tuple[netlab.Lab, str]):
    e = Env(*module_lab)
    yield e
    for p in [*e.procs.values(), e.server]:
        p.stop()


def test_same_pod_ip_on_two_nodes_each_reaches_the_other_by_vip(env: Env) -> None:
    for here, there, own_name, other_name in (("a1", "b1", "db-0", "db-1"),
                                              ("b1", "a1", "db-1", "db-0")):
        vip = env.vip(here, f"{other_name}.db.{Z}")
        env.wait_curl(here, f"{other_name}.db.{Z}", 80, vip, f"pod {there}")
        # its own Pod: the real IP, by name and by address, never intercepted
        assert env.dig(here, f"{own_name}.db.{Z}") == [POD]
        assert env.curl(here, f"{own_name}.db.{Z}", 80, POD) == f"pod {here}"
        own_ptr = env.ns[here].run("dig", "+short", "-p", "1053", "@127.0.0.1", "-x", POD,
                                   check=False).stdout.split()
        assert f"{own_name}.db.{Z}." in own_ptr and f"{other_name}.db.{Z}." not in own_ptr
        assert sorted(env.dig(here, f"db.{Z}")) == sorted([POD, vip])  # headless: both
        # PTR of the VIP names the remote Pod, and the pod name answers the VIP
        ptr = env.ns[here].run("dig", "+short", "-p", "1053", "@127.0.0.1", "-x", vip,
                               check=False).stdout.split()
        # every name of that Pod (b1's is an endpoint of the nginx Services too), no other
        assert ptr == sorted([f"{other_name}.db.{Z}.", f"exp-{there}.node-exporter.{Z}."] + (
            [f"172-17-0-2.nginx-plain.{Z}.", f"172-17-0-2.nginx-svc.{Z}."]
            if there == "b1" else []))
    # each node's VIP for the other's Pod is the one derived from namespace/name, so every
    # node gives a Pod the same address
    derived = Allocator.of(MESH)
    derived.sync(["default/pod-a1", "default/pod-b1", "svc:default/nginx-svc"])
    assert env.vip("a1", f"db-1.db.{Z}") == derived.address("default/pod-b1")
    assert env.vip("b1", f"db-0.db.{Z}") == derived.address("default/pod-a1")
    view = json.loads(env.ns["a1"].run("curl", "-s", f"http://{ADMIN}/debug/proxy").stdout)
    cni = view["edgeCNI"]
    assert cni["meshCIDR"] == MESH and cni["mode"] == "auto" and cni["virtualIPs"] >= 2
    assert MESH in cni["steered"]["tcp"] and POD + "/32" not in cni["steered"]["tcp"]
    status = env.ns["a1"].run(*edgemesh_argv(), "status", "--admin", ADMIN,
                              check=False).stdout
    assert MESH in status and "pod-b1" in status
    assert metric(env.ns["a1"].run("curl", "-s", f"http://{ADMIN}/metrics").stdout,
                  "edgemesh_cni_pod_connections_total", node="b1") >= 1


def test_udp_across_a_vip_echoes_one_datagram(env: Env) -> None:
    vip = env.vip("a1", f"db-1.db.{Z}")
    out = env.ns["a1"].run("python3", "-c", UDP_ONCE, vip, timeout=30).stdout.strip()
    assert out == "b1 ping"


def test_legacy_headless_proxy_balances_with_the_port_mapping(env: Env) -> None:
    name = f"nginx-svc.{Z}"
    vip = env.vip("a1", name)
    assert vip != env.vip("a1", f"db-1.db.{Z}")  # the Service's own VIP, not the Pod's
    env.wait_curl("a1", name, 12345, vip, "pod b1")
    # without the annotation: the Kubernetes answer (the Pod, here by its VIP), no mapping
    plain = f"nginx-plain.{Z}"
    pod_vip = env.vip("a1", plain)
    assert pod_vip == env.vip("a1", f"db-1.db.{Z}")
    assert env.curl("a1", plain, 12345, pod_vip) == ""  # nothing listens on 12345
    assert env.curl("a1", plain, 80, pod_vip) == "pod b1"


def test_prometheus_on_the_cloud_scrapes_both_exporters_at_the_same_pod_ip(env: Env) -> None:
    def cni(text: str, node: str) -> float:
        return metric(text, "edgemesh_cni_pod_connections_total", node=node)

    def metrics() -> str:
        return env.ns["c1"].run("curl", "-s", f"http://{ADMIN}/metrics").stdout
    before = {n: cni(metrics(), n) for n in EDGE}
    vips = {}
    for node in EDGE:
        name = f"exp-{node}.node-exporter.{Z}"
        vips[node] = env.vip("c1", name)  # 172.17.0.2 is both nodes' Pod: a VIP each
        expect = f'node_exporter_up{{node="{node}"}} 1\n'
        netlab.wait_for(lambda n=name, v=vips[node], e=expect:
                        env.curl("c1", n, 9100, v, "/metrics") == e,
                        timeout=20, what=f"c1 scrapes {name} at {vips[node]}")
        for _ in range(2):
            assert env.curl("c1", name, 9100, vips[node], "/metrics") == expect
    assert vips["a1"] != vips["b1"]
    assert sorted(env.dig("c1", f"node-exporter.{Z}")) == sorted(vips.values())
    text = metrics()
    for n in EDGE:  # the scrapes, counted per peer node
        assert cni(text, n) >= before[n] + 3


def test_a_deleted_pod_loses_its_vip_and_interception(env: Env) -> None:
    vip = env.vip("a1", f"db-1.db.{Z}")
    assert env.curl("a1", f"db-1.db.{Z}", 80, vip) == "pod b1"
    docs = [d for d in manifests() if d["kind"] != "EndpointSlice"]
    docs += headless("db", 80, 80, "http", [endpoint("a1", "db-0")])[1:]  # pod-b1 gone
    meshlab.write(env.tmp, "m/all.yaml", yaml.safe_dump_all(docs))

    def gone() -> bool:
        view = json.loads(env.ns["a1"].run("curl", "-s", f"http://{ADMIN}/debug/proxy").stdout)
        return all(v["vip"] != vip for v in view["edgeCNI"]["virtualIPList"])
    netlab.wait_for(gone, timeout=10, what="the deleted Pod's VIP released")
    assert env.dig("a1", f"db-1.db.{Z}") == []  # NXDOMAIN
    assert env.curl("a1", f"db-1.db.{Z}", 80, vip) == ""  # closed: no Pod there
    assert env.dig("a1", f"db.{Z}") == [POD]  # a1's own Pod, at its real IP


def test_cleanup_after_a_crash_removes_the_mesh_range_rules(env: Env) -> None:
    a1 = env.ns["a1"]

    def rules() -> str:
        return a1.run("iptables-save").stdout
    assert MESH in rules()  # one rule per protocol for the whole range, not one per Pod
    assert sum(MESH in line for line in rules().splitlines()) <= 4
    env.procs["a1"].stop(signal.SIGKILL)
    assert MESH in rules()
    a1.run(*edgemesh_argv(), "cleanup", "--config", os.path.join(env.tmp, "config.yaml"))
    assert MESH not in rules()
