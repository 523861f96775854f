"""NAT traversal end to end: which path two agents end up on, for each pair of NAT behaviours.

Two sites behind NAT routers that drop unsolicited inbound packets, two ``edgemesh server``s
and one ``edgemesh agent --relay`` on the "internet", agents a1, a2 (site A) and b1 (site B).
Every agent keeps control links to all three relays. Each cell sets the routers' NAT modes,
restarts a1 and b1 (fresh paths), sends real traffic (curl) and asserts the path that
``edgemesh status --json`` reports for the peer.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterator

import pytest
import yaml

from tests import netlab
from tests.e2e import meshlab
from tests.procs import Proc, wait_ready

pytestmark = pytest.mark.netns

POD = "172.17.0.2"
ADMIN = "127.0.0.1:10557"
SERVERS = {"srv1": "198.18.0.10", "srv2": "198.18.0.11"}
RELAY_AGENT = ("relay1", "198.18.0.12")
RELAYS = [f"{ip}:20004" for ip in SERVERS.values()] + [f"{RELAY_AGENT[1]}:20006"]
NODES = {"a1": "192.168.10.2", "a2": "192.168.10.3", "b1": "192.168.20.2"}
WAN = {"a": "198.18.0.1", "b": "198.18.0.2"}

ECHO_CLIENT = textwrap.dedent("""
    import socket, sys, time
    s = socket.create_connection(("10.96.2.2", 80), timeout=10)
    end = time.monotonic() + float(sys.argv[1]); n = 0
    while time.monotonic() < end:
        msg = b"tick %d\\n" % n; s.sendall(msg); got = b""
        while len(got) < len(msg):
            chunk = s.recv(100)
            assert chunk, "connection closed"
            got += chunk
        assert got == msg, got
        n += 1; time.sleep(0.05)
    print(n)
""")


def service(name: str, ip: str, target: int, node: str) -> list[dict]:
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
         "spec": {"clusterIP": ip, "ports": [{"name": "tcp", "port": 80, "targetPort": target,
                                              "protocol": "TCP"}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-1", "namespace": "default",
                      "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4", "ports": [{"name": "tcp", "port": target, "protocol": "TCP"}],
         "endpoints": [{"addresses": [POD], "nodeName": node}]}]


class Matrix:
    def __init__(self, lab: netlab.Lab, tmp: str) -> None:
        self.lab, self.tmp = lab, tmp
        self.events: list[str] = []
        inet = lab.switch("inet", "198.18.0.254/24")
        self.sites = {s: lab.site(s, inet, wan=f"{WAN[s]}/24", lan=f"192.168.{n}0.1/24")
                      for s, n in (("a", 1), ("b", 2))}
        self.ns = {n: lab.host(n, self.sites[n[0]].lan, f"{ip}/24",
                               gw=self.sites[n[0]].lan_ip) for n, ip in NODES.items()}
        for n in NODES:  # a restarted agent reuses its tunnel port towards the same servers
            self.ns[n].sysctl("net.ipv4.tcp_tw_reuse", "1")
        for name, ip in [*SERVERS.items(), RELAY_AGENT]:
            self.ns[name] = lab.host(name, inet, f"{ip}/24")
        docs = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": n},
                 "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}
                for n, ip in NODES.items()]
        docs += service("web-b", "10.96.2.1", 8000, "b1") + service("echo-b", "10.96.2.2",
                                                                   8080, "b1")
        docs += service("web-a2", "10.96.2.3", 8000, "a2")
        self.mdir = os.path.join(tmp, "manifests")
        os.mkdir(self.mdir)
        meshlab.write(self.tmp, "manifests/all.yaml", yaml.safe_dump_all(docs))
        self.psk = meshlab.write(self.tmp, "psk", "correct horse battery staple, nat matrix")
        self.config = meshlab.write(self.tmp, "config.yaml", yaml.safe_dump(
            {"modules": {"edgeDNS": {"enable": False}}}))
        for n in ("b1", "a2"):
            ns = self.ns[n]
            ns.run("ip", "addr", "add", f"{POD}/32", "dev", "lo")
            www = os.path.join(tmp, f"www-{n}")
            os.mkdir(www)
            meshlab.write(self.tmp, f"www-{n}/index.html", f"hello from {n}")
            ns.popen(["python3", "-m", "http.server", "8000", "--bind", POD, "--directory", www])
        self.ns["b1"].popen(["socat", f"TCP-LISTEN:8080,bind={POD},reuseaddr,fork",
                             "SYSTEM:cat"])
        self.relays: dict[str, Proc] = {}
        self.start_relays()
        self.agents = {n: self.agent(n) for n in NODES}
        for n in NODES:
            wait_ready(self.agents[n], ADMIN, self.ns[n], timeout=40)

    def start_relays(self) -> None:
        for name in SERVERS:
            if name not in self.relays or not self.relays[name].alive():
                config = meshlab.write(self.tmp, f"{name}.yaml", yaml.safe_dump(
                    {"kind": "EdgeMeshServer", "nodeName": name}))
                self.relays[name] = Proc(
                    ["server", "--config", config, "--listen", "0.0.0.0:20004",
                     "--psk-file", self.psk, "--admin", ADMIN,
                     "--state-dir", os.path.join(self.tmp, f"state-{name}")],
                    ns=self.ns[name])
        name = RELAY_AGENT[0]
        if name not in self.relays or not self.relays[name].alive():
            self.relays[name] = Proc(
                ["agent", "--config", self.config, "--manifests", self.mdir, "--node-name",
                 name, "--relay", "--admin", ADMIN, "--psk-file", self.psk, "--no-iptables",
                 "--state-dir", os.path.join(self.tmp, f"state-{name}")], ns=self.ns[name])
        for name, proc in self.relays.items():
            wait_ready(proc, ADMIN, self.ns[name], timeout=40)

    def agent(self, node: str) -> Proc:
        args = ["agent", "--config", self.config, "--manifests", self.mdir, "--node-name", node,
                "--admin", ADMIN, "--psk-file", self.psk,
                "--state-dir", os.path.join(self.tmp, f"state-{node}")]
        for relay in RELAYS:
            args += ["--server", relay]
        if node == "a2":  # one NAT maps one inner port to one public port per destination
            args += ["--tunnel-listen", "0.0.0.0:20007"]
        return Proc(args, ns=self.ns[node])

    def restart(self, *nodes: str, between: Callable[[], None] = lambda: None) -> None:
        for n in nodes:
            self.agents[n].stop()
        between()  # e.g. new NAT rules, flushed with no agent re-creating old mappings
        for n in nodes:
            self.agents[n] = self.agent(n)
        for n in nodes:
            wait_ready(self.agents[n], ADMIN, self.ns[n], timeout=40)

    def set_nat(self, site: str, mode: str) -> None:
        """MASQUERADE with or without --random-fully; the flush makes it apply at once."""
        router = self.sites[site].router
        router.run("iptables", "-t", "nat", "-F", "POSTROUTING")
        extra = ["--random-fully"] if mode == "random-fully" else []
        router.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-s",
                   f"192.168.{1 if site == 'a' else 2}0.0/24", "-o", "wan0", "-j", "MASQUERADE",
                   *extra)
        router.run("conntrack", "-F", check=False)
        self.events.append(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} "
                           f"nat {site} {mode}")

    def peer(self, node: str, peer: str) -> dict:
        out = self.ns[node].run(sys.executable, "-m", "edgemesh", "status", "--json", "--admin",
                                ADMIN).stdout
        rows = [p for p in json.loads(out)["peers"] if p["node"] == peer]
        return next((p for p in rows if p.get("active")), rows[0] if rows else {})

    def curl(self, node: str, ip: str) -> str:
        return self.ns[node].run("curl", "-sS", "--max-time", "20", f"http://{ip}/",
                                 check=False, timeout=30).stdout

    def registered_nat(self, node: str) -> str:
        rows = json.loads(self.ns["srv1"].run("curl", "-s",
                                              f"http://{ADMIN}/debug/registrations").stdout)
        return next((r.get("nat", "") for r in rows if r["node"] == node), "")

    def wait_path(self, node: str, peer: str, path: str, timeout: float,
                  address: str = "") -> dict:
        def reached() -> dict | None:
            p = self.peer(node, peer)
            ok = p.get("path") == path and address in p.get("address", "")
            return p if ok else None
        try:
            return netlab.wait_for(reached, timeout, interval=0.2, what=f"{peer} {path}")
        except TimeoutError:
            regs = "".join(self.ns[s].run("curl", "-s", f"http://{ADMIN}/debug/registrations")
                           .stdout for s in SERVERS if self.relays[s].alive())
            log = "\n".join([*self.events, self.agents[node].log()[-3000:], f"--- {peer}",
                             self.agents[peer].log()[-3000:], regs])
            raise AssertionError(f"{node} -> {peer}: not {path} within {timeout}s: "
                                 f"{self.peer(node, peer)}\n{log}") from None


@pytest.fixture(scope="module")
def matrix(module_lab: tuple[netlab.Lab, str]) -> Iterator[Matrix]:
    m = Matrix(*module_lab)
    yield m
    for p in [*m.agents.values(), *m.relays.values()]:
        p.stop()


def fresh_cell(m: Matrix, nat_a: str, nat_b: str) -> None:
    m.start_relays()
    m.restart("a1", "b1", between=lambda: (m.set_nat("a", nat_a), m.set_nat("b", nat_b)))
    symmetric = {"a1": nat_a == "random-fully", "b1": nat_b == "random-fully"}
    for node, sym in symmetric.items():  # each agent has heard from all three relays
        want = "symmetric" if sym else "port-preserving"
        try:
            netlab.wait_for(lambda n=node, w=want: m.registered_nat(n) == w, 20,
                            what=f"{node} registered as {want}")
        except TimeoutError:
            regs = m.ns["srv1"].run("curl", "-s", f"http://{ADMIN}/debug/registrations").stdout
            raise AssertionError(f"{node} not {want}: {regs}\n{m.agents[node].log()[-3000:]}"
                                 f"\n--- srv1 ---\n{m.relays['srv1'].log()[-3000:]}") from None


def test_same_lan_is_direct(matrix: Matrix) -> None:
    assert matrix.curl("a1", "10.96.2.3") == "hello from a2"
    p = matrix.peer("a1", "a2")
    assert p["path"] == "direct" and p["address"].startswith(NODES["a2"]), p


def test_masquerade_pair_punches(matrix: Matrix) -> None:
    fresh_cell(matrix, "masquerade", "masquerade")
    assert matrix.curl("a1", "10.96.2.1") == "hello from b1"
    p = matrix.wait_path("a1", "b1", "punched", 15, address=WAN["b"])
    assert any(a["path"] == "punch-tcp" and a["result"] == "ok" for a in p["attempts"]), p
    assert matrix.peer("b1", "a1")["path"] == "punched"
    assert matrix.curl("a1", "10.96.2.1") == "hello from b1"


@pytest.mark.parametrize("nat_a", ["masquerade", "random-fully"])
def test_a_symmetric_nat_is_relayed_and_says_why(matrix: Matrix, nat_a: str) -> None:
    fresh_cell(matrix, nat_a, "random-fully")
    assert matrix.curl("a1", "10.96.2.1") == "hello from b1"
    p = matrix.wait_path("a1", "b1", "relayed", 10)
    assert "symmetric NAT" in p["detail"], p
    assert p["next_attempt_in"] is not None, p
    assert any(a["path"] == "punch-tcp" and a["result"] == "failed" and
               "symmetric" in a["reason"] for a in p["attempts"]), p


def test_a_lost_mapping_falls_back_to_the_relay_then_punches_again(matrix: Matrix) -> None:
    fresh_cell(matrix, "masquerade", "masquerade")
    assert matrix.curl("a1", "10.96.2.1") == "hello from b1"
    matrix.wait_path("a1", "b1", "punched", 15)
    # site B's router loses its mappings, and new ones get random ports for a while
    matrix.set_nat("b", "random-fully")
    lost = time.monotonic()
    matrix.wait_path("a1", "b1", "relayed", 5)
    assert time.monotonic() - lost < 5.5
    assert matrix.curl("a1", "10.96.2.1") == "hello from b1"
    matrix.set_nat("b", "masquerade")  # the mapping comes back punchable
    p = matrix.wait_path("a1", "b1", "punched", 45)
    assert p["address"].startswith(WAN["b"])
    assert matrix.curl("a1", "10.96.2.1") == "hello from b1"


def test_killing_the_relay_moves_the_peer_to_another_within_5s(matrix: Matrix) -> None:
    fresh_cell(matrix, "masquerade", "random-fully")
    assert matrix.curl("a1", "10.96.2.1") == "hello from b1"
    p = matrix.wait_path("a1", "b1", "relayed", 10)
    names = {ip: name for name, ip in [*SERVERS.items(), RELAY_AGENT]}
    used: list[str] = []
    for _ in range(2):  # kill the relay in use twice: server -> server -> the --relay agent
        address = p["address"].removeprefix("via ")
        used.append(names[address.split(":")[0]])
        matrix.relays[used[-1]].stop()
        killed = time.monotonic()
        p = netlab.wait_for(lambda a=address: (lambda q: q if q.get("path") == "relayed" and
                                               a not in q.get("address", "") else None)(
            matrix.peer("a1", "b1")), 5.5, interval=0.2, what="relayed via another relay")
        assert time.monotonic() - killed < 5.5, p
        assert matrix.curl("a1", "10.96.2.1") == "hello from b1"
    assert p["address"] == f"via {RELAYS[2]}", p  # what is left: the relaying agent
    assert sorted(used) == ["srv1", "srv2"]


def test_a_punched_pair_outlives_every_server(matrix: Matrix) -> None:
    fresh_cell(matrix, "masquerade", "masquerade")
    assert matrix.curl("a1", "10.96.2.1") == "hello from b1"
    assert matrix.curl("a1", "10.96.2.3") == "hello from a2"
    matrix.wait_path("a1", "b1", "punched", 15)
    ticker = matrix.ns["a1"].popen([sys.executable, "-c", ECHO_CLIENT, "6"],
                                   stdout=-1, stderr=-1)
    time.sleep(1.0)
    for proc in matrix.relays.values():
        proc.stop()
    out, err = ticker.communicate(timeout=30)
    assert ticker.returncode == 0, err
    assert int(out) > 20  # the echo kept answering while the servers went away
    assert matrix.peer("a1", "b1")["path"] == "punched"
    assert matrix.curl("a1", "10.96.2.1") == "hello from b1"
    # same LAN, no server at all: a2 restarts, a1 reconnects to its LAN address
    matrix.agents["a2"].stop()
    matrix.agents["a2"] = matrix.agent("a2")
    # curl only once a2 listens: failed connects before that would only teach a1's proxy
    # that the endpoint is down
    netlab.wait_for(lambda: ":20007" in matrix.ns["a2"].run("ss", "-ltnH").stdout, 30,
                    interval=0.2, what="a2 listening again")
    try:
        netlab.wait_for(lambda: matrix.curl("a1", "10.96.2.3") == "hello from a2", 20,
                        interval=0.5, what="a1 -> a2 with every server down")
    except TimeoutError:
        raise AssertionError(f"{matrix.peer('a1', 'a2')}\n{matrix.agents['a1'].log()[-4000:]}"
                             f"\n--- a2\n{matrix.agents['a2'].log()[-2000:]}") from None
    assert matrix.peer("a1", "a2")["path"] == "direct"
