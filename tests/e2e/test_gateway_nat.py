"""Outside clients reach a service on a node behind NAT through `edgemesh gateway` (issue 8):
the gateway routes by Istio Gateway/VirtualService, and its tunnel carries the connection to
the agent of the node the endpoint lives on.

Topology (one lab for the module):

    inet 198.18.0.0/24 ── srv      198.18.0.10   edgemesh server (rendezvous + relay)
                       ├─ gw-node  198.18.0.20   edgemesh gateway --node-name gw-node, tunnel on
                       ├─ outside  198.18.0.100  curl, a TCP client
                       └─ b-r      198.18.0.2    NAT router, drops unsolicited inbound
                                    └─ lan 192.168.20.0/24 ── b1 192.168.20.2 edgemesh agent,
                                       pod 172.17.0.2 on lo: HTTP server, TCP echo

Only b1 has 172.17.0.2 and only b1 serves what the clients get back (its own marker text);
neither the gateway nor the outside client can route to b1 or its pod, and the router drops
anything b1 did not ask for, so every answer crossed the mesh.
"""
from __future__ import annotations

import os
import sys
import textwrap

import pytest
import yaml

from tests import netlab
from tests.e2e import meshlab
from tests.e2e.meshlab import TCP_CLIENT, metric
from tests.procs import Proc, wait_ready

pytestmark = pytest.mark.netns

SERVER_IP, GW, OUT = "198.18.0.10", "198.18.0.20", "198.18.0.100"
SERVER = f"{SERVER_IP}:{meshlab.SERVER_PORT}"
B1 = "192.168.20.2"
POD = "172.17.0.2"
ADMIN = "127.0.0.1:10557"
SERVER_ADMIN = "127.0.0.1:10558"
HELLO = "hello from b1, behind the NAT"

TCP_ECHO = textwrap.dedent("""
    import socket, sys, threading
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], 9001)); s.listen(16)
    def one(c):
        data = b""
        while chunk := c.recv(65536): data += chunk
        c.sendall(b"b1 behind NAT got: " + data); c.close()
    while True:
        c, _ = s.accept(); threading.Thread(target=one, args=(c,), daemon=True).start()
""")

ROUTES = """
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: edge-gw, namespace: default}
spec:
  selector: {kubeedge: edgemesh-gateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["shop.example.com"]
  - port: {number: 9000, name: tcp, protocol: TCP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: shop, namespace: default}
spec:
  hosts: ["shop.example.com"]
  gateways: ["edge-gw"]
  http:
  - match: [{uri: {prefix: /shop/}}]
    route: [{destination: {host: web-b1, port: {number: 80}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: ["*"]
  gateways: ["edge-gw"]
  tcp:
  - route: [{destination: {host: echo-b1, port: {number: 80}}}]
"""


class Env:
    def __init__(self, lab: netlab.Lab, tmp: str) -> None:
        self.lab, self.tmp = lab, tmp
        inet = lab.switch("inet", "198.18.0.254/24")
        self.srv = lab.host("srv", inet, f"{SERVER_IP}/24")
        self.gw = lab.host("gw-node", inet, f"{GW}/24")
        self.outside = lab.host("outside", inet, f"{OUT}/24")
        site = lab.site("b", inet, wan="198.18.0.2/24", lan="192.168.20.1/24")
        self.b1 = lab.host("b1", site.lan, f"{B1}/24", gw="192.168.20.1")
        self.b1.run("ip", "addr", "add", f"{POD}/32", "dev", "lo")
        self.psk = meshlab.write(self.tmp, "psk", "gateway through NAT, cluster secret")
        self.mdir = os.path.join(tmp, "manifests")
        os.mkdir(self.mdir)
        docs = meshlab.nodes({"b1": B1, "gw-node": GW})
        docs += meshlab.service("web-b1", "10.96.2.1", 80, 8000, "b1", POD, port_name="http")
        docs += meshlab.service("echo-b1", "10.96.2.2", 80, 9001, "b1", POD)
        meshlab.write(self.tmp, "manifests/services.yaml", yaml.safe_dump_all(docs))
        meshlab.write(self.tmp, "manifests/routes.yaml", ROUTES)
        self.start_pods()
        self.procs: list[Proc] = [meshlab.server(self.srv, tmp, self.psk, SERVER_ADMIN)]
        agent_config = meshlab.write(self.tmp, "agent.yaml", yaml.safe_dump(
            {"modules": {"edgeDNS": {"enable": False}}}))
        self.agent = Proc(["agent", "--config", agent_config, *self.mesh("b1")], ns=self.b1)
        gw_config = meshlab.write(self.tmp, "gateway.yaml", yaml.safe_dump(
            {"kind": "EdgeMeshGateway", "modules": {"edgeTunnel": {"enable": True},
                                                    "edgeGateway": {"interfaceResync": 1.0}}}))
        self.gateway = Proc(["gateway", "--config", gw_config, "--nic", "eth0",
                             *self.mesh("gw-node")], ns=self.gw)
        self.procs += [self.agent, self.gateway]
        wait_ready(self.agent, ADMIN, self.b1, timeout=40)
        wait_ready(self.gateway, ADMIN, self.gw, timeout=40)

    def mesh(self, node: str) -> list[str]:
        return meshlab.mesh_args(node, SERVER, self.psk, os.path.join(self.tmp, f"state-{node}"),
                                 ADMIN, [self.mdir])

    def start_pods(self) -> None:
        www = os.path.join(self.tmp, "www", "shop")
        os.makedirs(www)
        with open(os.path.join(www, "index.html"), "w") as f:
            f.write(HELLO)
        self.b1.popen(["python3", "-m", "http.server", "8000", "--bind", POD, "--directory",
                       os.path.dirname(www)])
        self.b1.popen(["python3", "-c", TCP_ECHO, POD])
        netlab.wait_for(lambda: self.b1.run("curl", "-s", f"http://{POD}:8000/shop/",
                                            check=False).stdout == HELLO, 15, what="pod up")

    def curl(self, *args: str, check: bool = True) -> str:
        return self.outside.run("curl", "-sS", "--max-time", "30", *args, check=check).stdout

    def status(self) -> dict:
        import json
        out = self.gw.run(sys.executable, "-m", "edgemesh", "status", "--json", "--admin",
                          ADMIN).stdout
        return json.loads(out)


@pytest.fixture(scope="module")
def env(module_lab: tuple[netlab.Lab, str]):
    e = None
    try:
        e = Env(*module_lab)
        yield e
    finally:
        if e is not None:
            if os.environ.get("EDGEMESH_TEST_LOGS"):
                for p in e.procs:
                    print(p.log())
            for p in e.procs:
                p.stop()


def test_nothing_outside_the_nat_can_reach_b1_or_its_pod(env: Env) -> None:
    for ns in (env.gw, env.outside):
        for target in (f"http://{POD}:8000/shop/", f"http://{B1}:8000/shop/"):
            r = ns.run("curl", "-sS", "--max-time", "3", target, check=False)
            assert r.returncode != 0 and HELLO not in r.stdout


def test_http_host_and_path_through_the_gateway_reach_the_natted_backend(env: Env) -> None:
    served = metric(env.b1.run("curl", "-s", f"http://{ADMIN}/metrics").stdout,
                    "edgemesh_tunnel_streams_served_total")
    assert env.curl("-H", "Host: shop.example.com", f"http://{GW}/shop/") == HELLO
    # the route is by host and path: another host or path is not sent to b1
    other = env.curl("-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: blog.example.com",
                     f"http://{GW}/shop/", check=False)
    assert other == "404"
    miss = env.curl("-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: shop.example.com",
                    f"http://{GW}/elsewhere", check=False)
    assert miss == "404"
    after = metric(env.b1.run("curl", "-s", f"http://{ADMIN}/metrics").stdout,
                   "edgemesh_tunnel_streams_served_total")
    assert after >= served + 1  # b1's agent served the gateway's stream


def test_tcp_port_through_the_gateway_reaches_the_natted_backend(env: Env) -> None:
    out = env.outside.run("python3", "-c", TCP_CLIENT, GW, "9000", timeout=60).stdout
    assert out.strip() == "b1 behind NAT got: ping over the tunnel"


def test_the_gateway_reaches_b1_over_the_mesh_not_directly(env: Env) -> None:
    env.curl("-H", "Host: shop.example.com", f"http://{GW}/shop/")
    peers = {p["node"]: p for p in env.status()["peers"]}
    # The gateway node is on the open network, so b1's agent may reach it with an outbound
    # (direct) tunnel connection through its own NAT; punched and relayed are fine too. What
    # matters is that it is a tunnel session to b1's agent, never the pod address itself.
    assert peers["b1"]["path"] in ("direct", "relayed", "punched"), peers
    assert not peers["b1"]["address"].startswith("172.17."), peers
    if peers["b1"]["path"] == "relayed":
        assert peers["b1"]["address"] == f"via {SERVER}"
