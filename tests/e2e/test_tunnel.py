"""The tunnel end to end: two NATed sites that drop unsolicited inbound traffic, a server on
the "internet", an agent per node, pods on lo addresses no other node can route to (the same
pod IP at both sites). Real clients (curl, dig, a UDP socket, a WebSocket client) on site A
reach services on site B by name through the relay, and on A's own LAN directly.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from tests import netlab
from tests.e2e import meshlab
from tests.e2e.meshlab import TCP_CLIENT, metric
from tests.procs import Proc, wait_ready

pytestmark = pytest.mark.netns

SERVER_IP = "198.18.0.10"
SERVER = f"{SERVER_IP}:{meshlab.SERVER_PORT}"
POD = "172.17.0.2"  # the same pod IP on b1 and a2: routing must go by node
ADMIN = "127.0.0.1:10557"
SERVER_ADMIN = "127.0.0.1:10558"
NODES = {"a1": "192.168.10.2", "a2": "192.168.10.3", "b1": "192.168.20.2"}
MARKER = b"EDGEMESH-CLEARTEXT-MARKER-"
BIG = 100 * 1024 * 1024
RELAY_RATE = 40_000_000


def service(name: str, ip: str, port: int, target: int, node: str, proto: str = "TCP",
            port_name: str = "tcp") -> list[dict]:
    return meshlab.service(name, ip, port, target, node, POD, proto, port_name)


def manifests() -> list[dict]:
    docs = meshlab.nodes(NODES)
    docs += service("web-b", "10.96.1.1", 80, 8000, "b1", port_name="http")
    docs += service("echo-b", "10.96.1.2", 80, 8080, "b1")
    docs += service("udp-b", "10.96.1.3", 7, 7007, "b1", "UDP", "udp")
    docs += service("ws-b", "10.96.1.4", 80, 8765, "b1", port_name="http-ws")
    docs += service("web-a2", "10.96.1.5", 80, 8000, "a2", port_name="http")
    return docs


# a1 alone believes b1 has an endpoint 172.17.0.2:22 (a lying or stale node): b1 must refuse
LIE = service("lie", "10.96.1.9", 22, 22, "b1")

UDP_ECHO = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 7007))
    while True:
        data, peer = s.recvfrom(65535); s.sendto(b"echo " + data, peer)
""")
WS_ECHO = textwrap.dedent("""
    import sys
    from websockets.sync.server import serve
    def echo(ws):
        for m in ws: ws.send("ws " + m)
    with serve(echo, sys.argv[1], 8765) as s: s.serve_forever()
""")
WS_CLIENT = textwrap.dedent("""
    from websockets.sync.client import connect
    with connect("ws://10.96.1.4/", open_timeout=15) as ws:
        out = []
        for m in ("one", "two"):
            ws.send(m); out.append(ws.recv(timeout=10))
    print(",".join(out))
""")
UDP_CLIENT = textwrap.dedent("""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10)
    s.connect(("10.96.1.3", 7)); got = []
    for i in range(5):
        s.send(b"d" * (10 + i)); got.append(s.recv(65535).decode())
    print(",".join(got))
""")


class Env:
    def __init__(self, lab: netlab.Lab, tmp: str) -> None:
        self.lab, self.tmp = lab, tmp
        inet = lab.switch("inet", "198.18.0.254/24")
        self.srv = lab.host("srv", inet, f"{SERVER_IP}/24")
        site_a = lab.site("a", inet, wan="198.18.0.1/24", lan="192.168.10.1/24")
        site_b = lab.site("b", inet, wan="198.18.0.2/24", lan="192.168.20.1/24")
        self.routers = {"a": site_a.router, "b": site_b.router}
        lans = {"a": (site_a.lan, "192.168.10.1"), "b": (site_b.lan, "192.168.20.1")}
        self.ns = {n: lab.host(n, lans[n[0]][0], f"{ip}/24", gw=lans[n[0]][1])
                   for n, ip in NODES.items()}
        self.ns["x1"] = lab.host("x1", site_b.lan, "192.168.20.9/24", gw="192.168.20.1")
        for n in ("b1", "a2"):
            self.ns[n].run("ip", "addr", "add", f"{POD}/32", "dev", "lo")
        self.psk = meshlab.write(self.tmp, "psk", "correct horse battery staple, cluster one")
        self.mdir = os.path.join(tmp, "manifests")
        os.mkdir(self.mdir)
        meshlab.write(self.tmp, "manifests/all.yaml", yaml.safe_dump_all(manifests()))
        self.liedir = os.path.join(tmp, "lie")
        os.mkdir(self.liedir)
        meshlab.write(self.tmp, "lie/lie.yaml", yaml.safe_dump_all(LIE))
        # Hole punching off: these sites would punch (tests/e2e/test_nat_matrix.py covers
        # that); here the relay itself is under test.
        self.config = meshlab.write(self.tmp, "config.yaml", yaml.safe_dump({
            "modules": {"edgeDNS": {"enable": True, "listenAddress": "127.0.0.1",
                                    "listenPort": 1053,
                                    "cacheDNS": {"upstreamServers": ["127.0.0.1:9"]}},
                        "edgeTunnel": {"holePunching": False}}}))
        self.start_pods()
        self.procs: dict[str, Proc] = {}
        server_config = meshlab.write(self.tmp, "server.yaml", yaml.safe_dump(
            {"kind": "EdgeMeshServer", "server": {"relayBytesPerSecond": RELAY_RATE}}))
        self.server = meshlab.server(self.srv, tmp, self.psk, SERVER_ADMIN, server_config)
        for n in NODES:
            self.procs[n] = self.agent(n, self.ns[n], n)
        for n in NODES:
            wait_ready(self.procs[n], ADMIN, self.ns[n], timeout=40)

    def start_pods(self) -> None:
        b1, a2 = self.ns["b1"], self.ns["a2"]
        www = os.path.join(self.tmp, "www-b1")
        os.mkdir(www)
        with open(os.path.join(www, "index.html"), "w") as f:
            f.write("hello from b1")
        with open(os.path.join(www, "marker.txt"), "wb") as f:
            f.write(MARKER * 20000)
        self.big_sha = make_big(os.path.join(www, "big.bin"))
        b1.popen(["python3", "-m", "http.server", "8000", "--bind", POD, "--directory", www])
        b1.popen(["socat", f"TCP-LISTEN:8080,bind={POD},reuseaddr,fork", "SYSTEM:cat"])
        b1.popen(["python3", "-c", UDP_ECHO, POD])
        b1.popen([sys.executable, "-c", WS_ECHO, POD])
        wwwa = os.path.join(self.tmp, "www-a2")
        os.mkdir(wwwa)
        with open(os.path.join(wwwa, "index.html"), "w") as f:
            f.write("hello from a2")
        a2.popen(["python3", "-m", "http.server", "8000", "--bind", POD, "--directory", wwwa])

    def agent(self, name: str, ns: netlab.Netns, node: str, psk: str | None = None,
              state: str | None = None) -> Proc:
        mdirs = [self.mdir, self.liedir] if name == "a1" else [self.mdir]
        args = ["agent", "--config", self.config, *meshlab.mesh_args(
            node, SERVER, psk or self.psk, state or os.path.join(self.tmp, f"state-{name}"),
            ADMIN, mdirs)]
        return Proc(args, ns=ns)

    def run(self, node: str, *argv: str, timeout: float = 60) -> str:
        return self.ns[node].run(*argv, timeout=timeout).stdout

    def status(self, node: str) -> dict:
        out = self.run(node, sys.executable, "-m", "edgemesh", "status", "--json", "--admin",
                       ADMIN)
        return json.loads(out)

    def metrics(self, ns: netlab.Netns, admin: str = ADMIN) -> str:
        return ns.run("curl", "-s", f"http://{admin}/metrics").stdout


def make_big(path: str) -> str:
    digest = hashlib.sha256()
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB, incompressible enough
    with open(path, "wb") as f:
        for i in range(BIG // len(block)):
            chunk = bytes([i % 251]) + block[1:]
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def env(module_lab: tuple[netlab.Lab, str]):
    e = Env(*module_lab)
    yield e
    for p in [*e.procs.values(), e.server]:
        p.stop()


def curl(env: Env, node: str, url: str, *extra: str) -> str:
    return env.run(node, "curl", "-sS", "--max-time", "30", *extra, url)


def test_cross_site_services_by_name_through_the_relay(env: Env) -> None:
    ip = env.run("a1", "dig", "+short", "-p", "1053", "@127.0.0.1",
                 "web-b.default.svc.cluster.local").strip()
    assert ip == "10.96.1.1"
    assert curl(env, "a1", "http://web-b.default.svc.cluster.local/",
                "--resolve", f"web-b.default.svc.cluster.local:80:{ip}") == "hello from b1"
    assert env.run("a1", "python3", "-c", TCP_CLIENT, "10.96.1.2", "80").strip() == \
        "ping over the tunnel"
    assert env.run("a1", "python3", "-c", UDP_CLIENT).strip() == ",".join(
        "echo " + "d" * (10 + i) for i in range(5))
    assert env.run("a1", sys.executable, "-c", WS_CLIENT).strip() == "ws one,ws two"
    peers = {p["node"]: p for p in env.status("a1")["peers"]}
    assert peers["b1"]["path"] == "relayed", peers
    assert peers["b1"]["address"] == f"via {SERVER}"
    assert peers["b1"]["rtt_ms"] is not None or peers["b1"]["bytes_in"] > 0


def test_same_lan_goes_direct_and_pod_ips_may_repeat(env: Env) -> None:
    assert curl(env, "a1", "http://10.96.1.5/") == "hello from a2"
    assert curl(env, "a1", "http://10.96.1.1/") == "hello from b1"  # same pod IP, other node
    peers = {p["node"]: p for p in env.status("a1")["peers"]}
    assert peers["a2"]["path"] == "direct"
    assert peers["a2"]["address"].startswith(NODES["a2"])


def test_a_100mb_transfer_through_the_relay_arrives_intact_and_is_throttled(env: Env) -> None:
    before = metric(env.metrics(env.srv, SERVER_ADMIN), "edgemesh_relay_throttled_seconds_total",
                    peer="b1")
    start = time.monotonic()
    out = env.run("a1", "sh", "-c", "curl -sS --max-time 120 http://10.96.1.1/big.bin | "
                  "sha256sum", timeout=150)
    elapsed = time.monotonic() - start
    assert out.split()[0] == env.big_sha
    after = metric(env.metrics(env.srv, SERVER_ADMIN), "edgemesh_relay_throttled_seconds_total",
                   peer="b1")
    assert after > before  # b1 was over its bytes/s limit and waited
    # a lower bound only (a slow machine makes it longer, never shorter): the limit held
    assert elapsed >= 0.8 * BIG / RELAY_RATE - 1.0


def test_relay_sees_only_ciphertext(env: Env) -> None:
    pcap = os.path.join(env.tmp, "relay.pcap")
    dump = env.srv.popen(["tcpdump", "-i", "eth0", "-w", pcap, "-U", "-s", "0", "tcp"],
                         stderr=subprocess.PIPE)
    time.sleep(1.0)  # tcpdump must be capturing before the transfer starts
    body = curl(env, "a1", "http://10.96.1.1/marker.txt")
    assert body.encode() == MARKER * 20000
    time.sleep(0.5)
    dump.terminate()
    dump.wait(timeout=10)
    with open(pcap, "rb") as f:
        captured = f.read()
    assert len(captured) > len(MARKER) * 20000  # the transfer did cross the relay
    assert MARKER not in captured
    assert b"hello" not in captured and b"HTTP/1." not in captured


def test_a_stream_to_an_address_that_is_not_a_local_endpoint_is_refused(env: Env) -> None:
    before = metric(env.metrics(env.ns["b1"]), "edgemesh_tunnel_streams_refused_total",
                    reason="not_local_endpoint")
    r = env.ns["a1"].run("python3", "-c", TCP_CLIENT, "10.96.1.9", "22", check=False)
    assert "ping over the tunnel" not in r.stdout
    after = metric(env.metrics(env.ns["b1"]), "edgemesh_tunnel_streams_refused_total",
                   reason="not_local_endpoint")
    assert after >= before + 1


def test_a_circuit_whose_members_vanish_is_freed_and_the_mesh_recovers(env: Env) -> None:
    # both sites' packets to and from the relay are dropped: no FIN, no RST ever arrives,
    # as when a site loses power. The relay must notice by itself (TCP keepalive and user
    # timeout on circuit sockets), free the circuit, and serve again once the sites are back.
    assert curl(env, "a1", "http://10.96.1.1/") == "hello from b1"
    circuits = lambda: metric(env.metrics(env.srv, SERVER_ADMIN),  # noqa: E731
                              "edgemesh_relay_circuits")
    assert circuits() >= 1
    rules = [(chain, flag, wan) for wan in ("198.18.0.1", "198.18.0.2")
             for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d"))]
    for chain, flag, wan in rules:
        env.srv.run("iptables", "-I", chain, flag, wan, "-j", "DROP")
    try:
        netlab.wait_for(lambda: circuits() == 0, 75, 1.0, what="the relay freeing dead circuits")
    finally:
        for chain, flag, wan in rules:
            env.srv.run("iptables", "-D", chain, flag, wan, "-j", "DROP")
    netlab.wait_for(lambda: env.run("a1", "curl", "-s", "--max-time", "5",
                                    "http://10.96.1.1/", timeout=10) == "hello from b1",
                    120, 1.0, what="a1 reaching b1 through the relay again")


def test_wrong_psk_and_a_second_key_for_a_bound_name_are_refused(env: Env) -> None:
    x1 = env.ns["x1"]
    bad_psk = meshlab.write(env.tmp, "bad-psk", "not the cluster secret at all, sorry")
    p = env.agent("x1", x1, "x1", psk=bad_psk)
    try:
        netlab.wait_for(lambda: "no relay server reachable" in x1.run(
            "curl", "-s", f"http://{ADMIN}/readyz", check=False).stdout, 30, what="x1 readyz")
        regs = json.loads(env.srv.run("curl", "-s",
                                      f"http://{SERVER_ADMIN}/debug/registrations").stdout)
        assert "x1" not in {r["node"] for r in regs}
    finally:
        p.stop()
    real_key = bindings(env)["b1"]
    thief = env.agent("thief", x1, "b1")  # right PSK, fresh key, claims b1
    try:
        netlab.wait_for(lambda: metric(env.metrics(env.srv, SERVER_ADMIN),
                                       "edgemesh_tunnel_handshakes_total",
                                       result="bound_to_other_key") >= 1, 30,
                        what="server refusing the thief")
        assert bindings(env)["b1"] == real_key
        assert curl(env, "a1", "http://10.96.1.1/") == "hello from b1"
        # the operator's action frees the name; the next key to prove it gets it
        out = env.srv.run(sys.executable, "-m", "edgemesh", "server", "release", "b1",
                          "--state-dir", os.path.join(env.tmp, "state-srv")).stdout
        assert "released b1" in out
        netlab.wait_for(lambda: bindings(env).get("b1") not in (None, real_key), 30,
                        what="the released name bound to the new key")
    finally:
        thief.stop()


def bindings(env: Env) -> dict[str, str]:
    rows = json.loads(env.srv.run("curl", "-s", f"http://{SERVER_ADMIN}/debug/bindings").stdout)
    return {r["node"]: r["key"] for r in rows}

