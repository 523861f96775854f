"""IPv6 NodePorts end to end: a real agent with iptables and ip6tables in a "node" namespace,
pods with an IPv4 and an IPv6 address on its lo, real clients (curl -6, a connected UDP socket)
in a client namespace on the LAN (PREROUTING) and on the node itself (OUTPUT).

The node has two IPv6 addresses: fd00:50::1 (inside ``nodePortAddresses``) and fd00:51::1
(outside it), where a plain local server holds the NodePort's number, so "not intercepted" is
seen as that server's answer rather than as a mere failure; a plain server on fd00:50::1 holds
the nodePort of an IPv4-only service the same way. Backends answer with their own address,
so "the IPv6 listener balances over the IPv6 endpoints" is seen, not assumed.
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

NODE_IP, CLIENT_IP = "192.168.50.1", "192.168.50.2"
NODE_IP6, OTHER_NODE_IP6, CLIENT_IP6 = "fd00:50::1", "fd00:51::1", "fd00:50::2"
POD, POD6 = "172.17.0.2", "fd00:10:244::2"
ADMIN = "127.0.0.1:10562"
RANGES = ["192.168.50.0/24", "fd00:50::/64"]


def _service(name: str, ips: list[str], type_: str, port: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": type_, "clusterIP": ips[0], "clusterIPs": ips,
                     "ipFamilies": ["IPv6" if ":" in ip else "IPv4" for ip in ips],
                     "ports": [{"name": "p", **port}]}}


def _slice(name: str, ip: str, port: int, protocol: str) -> dict:
    family = "IPv6" if ":" in ip else "IPv4"
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-{family.lower()}", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": family,
            "ports": [{"name": "p", "port": port, "protocol": protocol}],
            "endpoints": [{"addresses": [ip], "nodeName": "node"}]}


def manifests() -> list[dict]:
    web = {"port": 80, "targetPort": 8080, "nodePort": 30080}
    echo = {"port": 7, "targetPort": 7007, "protocol": "UDP", "nodePort": 30007}
    return [
        _service("web", ["10.96.0.20", "fd00:10:96::20"], "NodePort", web),  # dual-stack
        _slice("web", POD, 8080, "TCP"), _slice("web", POD6, 8080, "TCP"),
        _service("echo", ["10.96.0.30", "fd00:10:96::30"], "NodePort", echo),
        _slice("echo", POD, 7007, "UDP"), _slice("echo", POD6, 7007, "UDP"),
        _service("lb6", ["fd00:10:96::50"], "LoadBalancer", {**web, "nodePort": 30050}),
        _slice("lb6", POD6, 8080, "TCP"),  # IPv6 only
        _service("v4", ["10.96.0.40"], "NodePort", {**web, "nodePort": 30040}),
        _slice("v4", POD, 8080, "TCP"),  # IPv4 only
    ]


class Env:
    def __init__(self, lab: netlab.Lab, tmp: str) -> None:
        self.tmp = tmp
        lan = lab.switch("lan")
        self.node = lab.host("node", lan, f"{NODE_IP}/24")
        self.client = lab.host("cli", lan, f"{CLIENT_IP}/24")
        for ns in (self.node, self.client):
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "0")
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "0")
        for ip in (f"{NODE_IP6}/64", f"{OTHER_NODE_IP6}/64"):
            self.node.run("ip", "addr", "add", ip, "dev", "eth0", "nodad")
        self.client.run("ip", "addr", "add", f"{CLIENT_IP6}/64", "dev", "eth0", "nodad")
        self.client.run("ip", "route", "add", "fd00:51::/64", "via", NODE_IP6)
        self.node.run("ip", "addr", "add", f"{POD}/32", "dev", "lo")
        self.node.run("ip", "addr", "add", f"{POD6}/128", "dev", "lo")
        for ip in (POD, POD6):
            listen = f"TCP6-LISTEN:8080,bind=[{ip}]" if ":" in ip else \
                f"TCP-LISTEN:8080,bind={ip}"
            self.node.answer_server(listen, ip)
            self.node.popen(["python3", "-c", UDP_ECHO, ip])
        for ip, port in ((OTHER_NODE_IP6, 30080), (NODE_IP6, 30040)):
            self.node.answer_server(f"TCP6-LISTEN:{port},bind=[{ip}]", "not intercepted")
        # listening before the first test: a refusing endpoint would fail it under load
        self.node.wait_listening(f"{POD}:8080", f"{POD}:7007", f"[{POD6}]:8080",
                                 f"[{POD6}]:7007", f"[{OTHER_NODE_IP6}]:30080",
                                 f"[{NODE_IP6}]:30040")
        self.mdir = os.path.join(tmp, "manifests")
        os.mkdir(self.mdir)
        with open(os.path.join(self.mdir, "all.yaml"), "w") as f:
            yaml.safe_dump_all(manifests(), f)
        self.proc = self.agent(RANGES)

    def agent(self, node_port_addresses: list[str]) -> Proc:
        config = os.path.join(self.tmp, "config.yaml")
        with open(config, "w") as f:
            yaml.safe_dump({"modules": {
                "edgeDNS": {"enable": False}, "edgeTunnel": {"enable": False},
                "edgeProxy": {"connectTimeout": 1.0, "nodePortAddresses": node_port_addresses,
                              "serviceCIDR": ["10.96.0.0/12", "fd00:10:96::/112"]}},
                "commonConfig": {"stateDir": os.path.join(self.tmp, "state")}}, f)
        proc = Proc(["agent", "--config", config, "--manifests", self.mdir, "--node-name",
                     "node", "--admin", ADMIN], ns=self.node)
        wait_ready(proc, ADMIN, self.node)
        netlab.wait_for(lambda: "[+] proxy ok" in self.node.run(
            "curl", "-s", f"http://{ADMIN}/readyz").stdout, timeout=20, what="proxy ready")
        return proc

    def restart(self, node_port_addresses: list[str]) -> None:
        self.proc.stop()
        self.proc = self.agent(node_port_addresses)

    def curl(self, ns: netlab.Netns, ip: str, port: int, max_time: float = 5) -> tuple[int, str]:
        # --http0.9: the backends and the plain servers answer a bare line, not HTTP
        url = f"http://[{ip}]:{port}/" if ":" in ip else f"http://{ip}:{port}/"
        r = ns.run("curl", "-sS", "-g", "--http0.9", "--max-time", str(max_time), url,
                   check=False)
        return r.returncode, r.stdout.strip()

    def udp(self, ns: netlab.Netns, ip: str, port: int) -> list[str]:
        return ns.run("python3", "-c", UDP_CLIENT, ip, str(port), timeout=20).stdout.split("\n")

    def save(self, binary: str) -> str:
        return self.node.run(f"{binary}-save", "-t", "nat").stdout

    def view(self) -> dict:
        return json.loads(self.node.run("curl", "-s", f"http://{ADMIN}/debug/proxy").stdout)


@pytest.fixture(scope="module")
def env(module_lab: tuple[netlab.Lab, str]):
    e = Env(*module_lab)
    yield e
    e.proc.stop()


def _node_port_rules(nat: str) -> list[str]:
    """The jumps to the NodePort chain, then its DNATs (``-save`` lists that chain first)."""
    lines = [line for line in nat.splitlines() if line.startswith("-A ")]
    return [line for line in lines if line.endswith("-j EDGEMESH-NODEPORTS")] + \
        [line for line in lines if line.startswith("-A EDGEMESH-NODEPORTS ")]


def test_each_family_gets_its_node_ports_within_its_own_ranges(env: Env) -> None:
    nat6, nat4 = _node_port_rules(env.save("ip6tables")), _node_port_rules(env.save("iptables"))
    assert nat6[0] == ("-A EDGEMESH-SERVICES -d fd00:50::/64 -m addrtype --dst-type LOCAL "
                       "-j EDGEMESH-NODEPORTS")
    assert nat4[0] == ("-A EDGEMESH-SERVICES -d 192.168.50.0/24 -m addrtype --dst-type LOCAL "
                       "-j EDGEMESH-NODEPORTS")
    ports6 = sorted(line.split("--dport ")[1].split()[0] for line in nat6[1:])
    ports4 = sorted(line.split("--dport ")[1].split()[0] for line in nat4[1:])
    assert ports6 == ["30050", "30080"]  # the IPv4-only service's 30040: not here
    assert ports4 == ["30040", "30080"]  # the IPv6-only service's 30050: not here
    # UDP 30007: TPROXY in each family's mangle table
    for binary in ("ip6tables", "iptables"):
        mangle = env.node.run(f"{binary}-save", "-t", "mangle").stdout
        assert mangle.count("-A EDGEMESH-TPROXY-NODEPORTS -p udp -m udp --dport 30007 ") == 1
    view = {f"{lst['service']}/{lst['family']}": lst for lst in env.view()["listeners"]}
    assert view["default/web/IPv6"]["addresses"] == ["[fd00:10:96::20]:80", "node:30080"]
    assert view["default/lb6/IPv6"]["addresses"] == ["[fd00:10:96::50]:80", "node:30050"]
    assert "default/v4/IPv6" not in view and "default/lb6/IPv4" not in view
    listen = view["default/web/IPv6"]["listen"]
    assert (f'--comment "default/web:80/tcp/ipv6" -j DNAT --to-destination {listen}'
            in "\n".join(nat6))


def test_tcp_node_port_over_ipv6_from_another_host_and_the_node(env: Env) -> None:
    for ns in (env.client, env.node):
        assert env.curl(ns, NODE_IP6, 30080) == (0, POD6)  # the IPv6 listener, IPv6 endpoint
        assert env.curl(ns, NODE_IP6, 30050) == (0, POD6)  # IPv6-only LoadBalancer
        assert env.curl(ns, NODE_IP, 30080) == (0, POD)    # IPv4 beside it, unchanged
    r = env.client.run("curl", "-6", "-sS", "-g", "--http0.9", "--max-time", "5",
                       f"http://[{NODE_IP6}]:30080/")
    assert r.stdout.strip() == POD6


def test_udp_node_port_over_ipv6_replies_from_the_address_sent_to(env: Env) -> None:
    for ns in (env.client, env.node):
        assert env.udp(ns, NODE_IP6, 30007)[:3] == [f"{POD6} ping {i}" for i in range(3)]


def test_ipv6_address_outside_node_port_addresses_is_not_intercepted(env: Env) -> None:
    for ns in (env.client, env.node):
        assert env.curl(ns, OTHER_NODE_IP6, 30080) == (0, "not intercepted")
    assert env.curl(env.node, "::1", 30080)[0] == 7  # ::1 is outside fd00:50::/64: refused


def test_ipv4_only_node_port_gets_no_ipv6_rule(env: Env) -> None:
    assert env.curl(env.client, NODE_IP, 30040) == (0, POD)
    for ns in (env.client, env.node):  # the plain server on the node's IPv6 address answers
        assert env.curl(ns, NODE_IP6, 30040) == (0, "not intercepted")


def test_host_firewall_dropping_ipv6_input_still_lets_node_ports_in(env: Env) -> None:
    env.node.run("ip6tables", "-A", "INPUT", "-i", "lo", "-j", "ACCEPT")
    env.node.run("ip6tables", "-A", "INPUT", "-p", "ipv6-icmp", "-j", "ACCEPT")  # NDP
    env.node.run("ip6tables", "-P", "INPUT", "DROP")
    try:
        assert env.curl(env.client, NODE_IP6, 30080) == (0, POD6)
        assert env.udp(env.client, NODE_IP6, 30007)[:1] == [f"{POD6} ping 0"]
        # the firewall is real: the plain local server is not reachable (curl times out)
        assert env.curl(env.client, OTHER_NODE_IP6, 30080, max_time=1.5)[0] == 28
    finally:
        env.node.run("ip6tables", "-P", "INPUT", "ACCEPT")
        env.node.run("ip6tables", "-D", "INPUT", "-p", "ipv6-icmp", "-j", "ACCEPT")
        env.node.run("ip6tables", "-D", "INPUT", "-i", "lo", "-j", "ACCEPT")


def test_no_node_port_addresses_means_every_local_ipv6_address_and_loopback(env: Env) -> None:
    env.restart([])
    assert _node_port_rules(env.save("ip6tables"))[0] == \
        "-A EDGEMESH-SERVICES -m addrtype --dst-type LOCAL -j EDGEMESH-NODEPORTS"
    for ns in (env.client, env.node):
        for ip in (NODE_IP6, OTHER_NODE_IP6):
            assert env.curl(ns, ip, 30080) == (0, POD6)
    # ::1 for clients on the node: the listener is local, so the DNAT needs no route_localnet
    assert env.curl(env.node, "::1", 30080) == (0, POD6)
    assert env.udp(env.node, "::1", 30007)[:3] == [f"{POD6} ping {i}" for i in range(3)]


def test_ipv4_ranges_only_mean_no_ipv6_node_ports(env: Env) -> None:
    env.restart(["192.168.50.0/24"])
    nat6 = env.save("ip6tables")
    assert _node_port_rules(nat6) == [] and "-d fd00:10:96::20/128" in nat6
    assert env.curl(env.client, NODE_IP6, 30080)[0] == 7  # refused: nothing listens there
    assert env.curl(env.node, "fd00:10:96::20", 80) == (0, POD6)  # ClusterIP still served
    assert env.curl(env.client, NODE_IP, 30080) == (0, POD)
    env.restart(["fd00:50::/64"])  # and vice versa
    assert _node_port_rules(env.save("iptables")) == []
    assert env.curl(env.client, NODE_IP, 30080)[0] == 7
    assert env.curl(env.client, NODE_IP6, 30080) == (0, POD6)
