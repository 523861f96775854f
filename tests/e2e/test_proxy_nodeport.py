"""NodePorts, externalIPs and load-balancer IPs end to end: a real agent with iptables in a
"node" namespace, a pod on its lo, real clients (curl, a connected UDP socket) in a client
namespace on the LAN and on the node itself.

The node has two addresses: 192.168.50.1 (inside ``nodePortAddresses``) and 192.168.51.1
(outside it), where a plain local server holds the same port number as the NodePort, so "not
intercepted" is seen as that server's answer rather than as a mere failure.
"""
from __future__ import annotations

import json
import os

import pytest
import yaml

from tests import netlab
from tests.e2e.udp_peers import UDP_CLIENT, UDP_ECHO
from tests.procs import Proc, wait_ready

pytestmark = pytest.mark.netns

NODE_IP, OTHER_NODE_IP, CLIENT_IP = "192.168.50.1", "192.168.51.1", "192.168.50.2"
POD = "172.17.0.2"
EXTERNAL_IP, LB_IP, LB_PROXY_IP, KUBE_EXTERNAL_IP = (
    "192.0.2.50", "203.0.113.7", "203.0.113.8", "192.0.2.51")
ADMIN = "127.0.0.1:10559"


def _service(name: str, cluster_ip: str, type_: str, ports: list[dict], labels: dict | None = None,
             status: dict | None = None, **spec: object) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "labels": labels or {}},
            "spec": {"type": type_, "clusterIP": cluster_ip, "ports": ports, **spec},
            "status": status or {}}


def _slice(name: str, port: int, protocol: str, port_name: str) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": port_name, "port": port, "protocol": protocol}],
            "endpoints": [{"addresses": [POD], "nodeName": "node"}]}


def manifests() -> list[dict]:
    http = {"name": "http", "port": 80, "targetPort": 8000, "nodePort": 30080}
    udp = {"name": "udp", "port": 7, "targetPort": 7007, "protocol": "UDP", "nodePort": 30007}
    return [
        _service("web", "10.96.0.20", "NodePort", [http], externalIPs=[EXTERNAL_IP]),
        _slice("web", 8000, "TCP", "http"),
        _service("echo", "10.96.0.30", "NodePort", [udp], externalIPs=[EXTERNAL_IP]),
        _slice("echo", 7007, "UDP", "udp"),
        _service("lb", "10.96.0.40", "LoadBalancer", [{**http, "port": 8080, "nodePort": 30081}],
                 status={"loadBalancer": {"ingress": [{"ip": LB_IP},
                                                      {"ip": LB_PROXY_IP, "ipMode": "Proxy"}]}}),
        _slice("lb", 8000, "TCP", "http"),
        # left to kube-proxy: none of its addresses may be intercepted
        _service("kube", "10.96.0.50", "NodePort", [{**http, "nodePort": 30090}],
                 labels={"service.edgemesh.kubeedge.io/service-proxy-name": "kube-proxy"},
                 externalIPs=[KUBE_EXTERNAL_IP]),
        _slice("kube", 8000, "TCP", "http"),
    ]


class Env:
    def __init__(self, lab: netlab.Lab, tmp: str) -> None:
        lan = lab.switch("lan")
        self.node = lab.host("node", lan, f"{NODE_IP}/24")
        self.node.run("ip", "addr", "add", f"{OTHER_NODE_IP}/24", "dev", "eth0")
        # the addresses we must not intercept are local too, so the node answers them (with
        # a refusal) instead of dropping them unrouted: a quick, unambiguous "not ours"
        for ip in (POD, LB_PROXY_IP, KUBE_EXTERNAL_IP):
            self.node.run("ip", "addr", "add", f"{ip}/32", "dev", "lo")
        self.client = lab.host("cli", lan, f"{CLIENT_IP}/24")
        for ip in (OTHER_NODE_IP, EXTERNAL_IP, LB_IP, LB_PROXY_IP, KUBE_EXTERNAL_IP):
            self.client.run("ip", "route", "add", ip, "via", NODE_IP)
        www = os.path.join(tmp, "www")
        os.mkdir(www)
        with open(os.path.join(www, "index.html"), "w") as f:
            f.write("hello from web")
        self.node.popen(["python3", "-m", "http.server", "8000", "--bind", POD,
                         "--directory", www])
        self.node.popen(["python3", "-c", UDP_ECHO, POD])
        self.node.answer_server(f"TCP-LISTEN:30080,bind={OTHER_NODE_IP}", "not intercepted")
        # listening before the first test: a refusing endpoint would fail it under load
        self.node.wait_listening(f"{POD}:8000", f"{POD}:7007", f"{OTHER_NODE_IP}:30080")
        self.tmp = tmp
        self.mdir = os.path.join(tmp, "manifests")
        os.mkdir(self.mdir)
        with open(os.path.join(self.mdir, "all.yaml"), "w") as f:
            yaml.safe_dump_all(manifests(), f)
        self.proc = self.agent(["192.168.50.0/24"])

    def agent(self, node_port_addresses: list[str]) -> Proc:
        config = os.path.join(self.tmp, "config.yaml")
        with open(config, "w") as f:
            yaml.safe_dump({"modules": {
                "edgeDNS": {"enable": False}, "edgeTunnel": {"enable": False},
                "edgeProxy": {"connectTimeout": 1.0,
                              "nodePortAddresses": node_port_addresses}},
                "commonConfig": {"stateDir": os.path.join(self.tmp, "state")}}, f)
        proc = Proc(["agent", "--config", config, "--manifests", self.mdir, "--node-name",
                     "node", "--admin", ADMIN], ns=self.node)
        wait_ready(proc, ADMIN, self.node)
        netlab.wait_for(lambda: "[+] proxy ok" in self.node.run(
            "curl", "-s", f"http://{ADMIN}/readyz").stdout, timeout=20, what="proxy ready")
        return proc

    def curl(self, ns: netlab.Netns, url: str, max_time: float = 5) -> tuple[int, str]:
        # --http0.9: the plain server on OTHER_NODE_IP answers a bare line, not HTTP
        r = ns.run("curl", "-sS", "--http0.9", "--max-time", str(max_time), url, check=False)
        return r.returncode, r.stdout

    def udp(self, ns: netlab.Netns, ip: str, port: int) -> list[str]:
        return ns.run("python3", "-c", UDP_CLIENT, ip, str(port), timeout=20).stdout.split("\n")

    def nat(self) -> str:
        return self.node.run("iptables-save", "-t", "nat").stdout

    def filter(self) -> str:
        return self.node.run("iptables-save", "-t", "filter").stdout


@pytest.fixture(scope="module")
def env(module_lab: tuple[netlab.Lab, str]):
    e = Env(*module_lab)
    yield e
    e.proc.stop()


def test_rules_cover_node_ports_external_and_lb_ips_only_for_our_services(env: Env) -> None:
    nat = env.nat()
    assert nat.count("-A EDGEMESH-SERVICES -d 192.168.50.0/24 -m addrtype --dst-type LOCAL "
                     "-j EDGEMESH-NODEPORTS") == 1
    for port in ("-p tcp -m tcp --dport 30080 ", "-p tcp -m tcp --dport 30081 "):
        assert f"-A EDGEMESH-NODEPORTS {port}" in nat
    assert f"-d {EXTERNAL_IP}/32 -p tcp -m tcp --dport 80 " in nat
    assert f"-d {LB_IP}/32 -p tcp -m tcp --dport 8080 " in nat
    # UDP: TPROXY in mangle, NodePorts within the same ranges, service addresses marked
    # when sent from this node
    mangle = env.node.run("iptables-save", "-t", "mangle").stdout
    assert mangle.count("-A EDGEMESH-TPROXY -d 192.168.50.0/24 -m addrtype --dst-type LOCAL "
                        "-j EDGEMESH-TPROXY-NODEPORTS") == 1
    assert "-A EDGEMESH-TPROXY-NODEPORTS -p udp -m udp --dport 30007 " in mangle
    assert f"-A EDGEMESH-TPROXY -d {EXTERNAL_IP}/32 -p udp -m udp --dport 7 " in mangle
    assert f"-A EDGEMESH-MARK -d {EXTERNAL_IP}/32 -p udp -m udp --dport 7 " in mangle
    for absent in (LB_PROXY_IP, KUBE_EXTERNAL_IP, "30090", "10.96.0.50"):
        assert absent not in nat + mangle
    view = json.loads(env.node.run("curl", "-s", f"http://{ADMIN}/debug/proxy").stdout)
    addresses = {f"{lst['service']}:{lst['port']}": lst["addresses"] for lst in view["listeners"]}
    assert addresses == {"default/web:80": ["10.96.0.20:80", f"{EXTERNAL_IP}:80", "node:30080"],
                         "default/echo:7": ["10.96.0.30:7", f"{EXTERNAL_IP}:7", "node:30007"],
                         "default/lb:8080": ["10.96.0.40:8080", f"{LB_IP}:8080", "node:30081"]}


def test_tcp_node_port_from_another_host(env: Env) -> None:
    assert env.curl(env.client, f"http://{NODE_IP}:30080/") == (0, "hello from web")
    assert env.curl(env.client, f"http://{NODE_IP}:30081/") == (0, "hello from web")  # LB type


def test_tcp_external_and_load_balancer_ips_routed_to_the_node(env: Env) -> None:
    assert env.curl(env.client, f"http://{EXTERNAL_IP}/") == (0, "hello from web")
    assert env.curl(env.client, f"http://{LB_IP}:8080/") == (0, "hello from web")
    # ipMode Proxy and kube-proxy's service: not ours, so the node refuses (curl exit 7)
    assert env.curl(env.client, f"http://{LB_PROXY_IP}:8080/")[0] == 7
    assert env.curl(env.client, f"http://{KUBE_EXTERNAL_IP}/")[0] == 7
    assert env.curl(env.client, f"http://{NODE_IP}:30090/")[0] == 7


def test_udp_replies_come_from_the_address_the_client_sent_to(env: Env) -> None:
    expected = [f"{POD} ping {i}" for i in range(3)]
    assert env.udp(env.client, NODE_IP, 30007)[:3] == expected
    assert env.udp(env.client, EXTERNAL_IP, 7)[:3] == expected
    assert env.udp(env.node, NODE_IP, 30007)[:3] == expected


def test_node_port_on_the_node_itself(env: Env) -> None:
    assert env.curl(env.node, f"http://{NODE_IP}:30080/") == (0, "hello from web")
    # 127.0.0.1 is outside nodePortAddresses (192.168.50.0/24): refused
    assert env.curl(env.node, "http://127.0.0.1:30080/")[0] == 7


def test_node_port_outside_node_port_addresses_is_not_intercepted(env: Env) -> None:
    for ns in (env.client, env.node):
        assert env.curl(ns, f"http://{OTHER_NODE_IP}:30080/") == (0, "not intercepted\n")


def test_host_firewall_dropping_input_still_lets_intercepted_traffic_in(env: Env) -> None:
    env.node.run("iptables", "-A", "INPUT", "-i", "lo", "-j", "ACCEPT")
    env.node.run("iptables", "-P", "INPUT", "DROP")
    try:
        assert env.curl(env.client, f"http://{NODE_IP}:30080/") == (0, "hello from web")
        assert env.curl(env.client, f"http://{EXTERNAL_IP}/") == (0, "hello from web")
        assert env.udp(env.client, NODE_IP, 30007)[:1] == [f"{POD} ping 0"]
        # the firewall is real: a plain local server is not reachable (curl times out)
        assert env.curl(env.client, f"http://{OTHER_NODE_IP}:30080/", max_time=1.5)[0] == 28
    finally:
        env.node.run("iptables", "-P", "INPUT", "ACCEPT")
        env.node.run("iptables", "-D", "INPUT", "-i", "lo", "-j", "ACCEPT")


def test_no_node_port_addresses_means_every_local_address(env: Env) -> None:
    env.proc.stop()
    env.proc = env.agent([])
    assert "-A EDGEMESH-SERVICES -m addrtype --dst-type LOCAL -j EDGEMESH-NODEPORTS" in env.nat()
    for ns in (env.client, env.node):
        for ip in (NODE_IP, OTHER_NODE_IP):
            assert env.curl(ns, f"http://{ip}:30080/") == (0, "hello from web")
    # loopback too, for clients on the node (the listener is local: no route_localnet needed)
    assert env.curl(env.node, "http://127.0.0.1:30080/") == (0, "hello from web")
    assert env.udp(env.node, "127.0.0.1", 30007)[:3] == [f"{POD} ping {i}" for i in range(3)]


def test_rules_vanish_on_exit(env: Env) -> None:
    env.proc.stop()
    assert "EDGEMESH" not in env.nat() and "EDGEMESH" not in env.filter()
    assert env.curl(env.client, f"http://{NODE_IP}:30080/")[0] == 7  # refused: nothing there
