"""Sessions, streams, the receiving-side policy and relay circuits, in one process on loopback.

Real sockets on 127.0.0.1 (no namespaces needed): two agents' tunnel modules built from a
Context like the agent's, a server, and TCP/UDP echo endpoints.
"""
from __future__ import annotations

import hashlib
import os
import socket

import gevent
import pytest

from edgemesh.config import Config
from edgemesh.context import Context
from edgemesh.errors import UnavailableError
from edgemesh.meta.models import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Node,
    ObjectMeta,
    Service,
    ServicePort,
)
from edgemesh.meta.store import Store
from edgemesh.runtime.admin import Admin
from edgemesh.server.main import Server
from edgemesh.tunnel import module as tunnel_module
from edgemesh.tunnel.policy import REFUSED


def tcp_echo() -> tuple[gevent.Greenlet, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def loop() -> None:
        while True:
            conn, _ = srv.accept()
            gevent.spawn(serve, conn)

    return gevent.spawn(loop), srv.getsockname()[1]


def udp_echo() -> tuple[gevent.Greenlet, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))

    def loop() -> None:
        while True:
            data, addr = s.recvfrom(65535)
            s.sendto(b"echo:" + data, addr)

    return gevent.spawn(loop), s.getsockname()[1]


def store_with(node: str, tcp_port: int, udp_port: int) -> Store:
    store = Store()
    svc = Service(ObjectMeta("echo", "default"), cluster_ips=("10.96.0.10",),
                  ports=(ServicePort("tcp", "TCP", 80, tcp_port),
                         ServicePort("udp", "UDP", 53, udp_port)))
    sl = EndpointSlice(ObjectMeta("echo-1", "default"), "echo",
                       endpoints=(Endpoint(("127.0.0.1",), node_name=node),),
                       ports=(EndpointPort("tcp", tcp_port, "TCP"),
                              EndpointPort("udp", udp_port, "UDP")))
    store.replace_many({"Service": [(svc, {})], "EndpointSlice": [(sl, {})]})
    store.mark_synced()
    return store


def make_config(tmp, name: str, psk: bytes, servers=(), relay=False, **tunnel) -> Config:
    cfg = Config()
    cfg.nodeName = name
    cfg.commonConfig.stateDir = str(tmp / name)
    psk_path = tmp / f"psk-{name}"
    psk_path.write_bytes(psk)
    t = cfg.modules.edgeTunnel
    t.psk.path = str(psk_path)
    t.listenAddress = "127.0.0.1"
    t.listenPort = 0
    t.servers = list(servers)
    t.relay = relay
    for k, v in tunnel.items():
        setattr(t, k, v)
    cfg.server.listen = "127.0.0.1:0"
    return cfg


PSK = b"the cluster secret, long enough"


@pytest.fixture
def echo():
    t, tport = tcp_echo()
    u, uport = udp_echo()
    yield tport, uport
    gevent.killall([t, u])


def agent(tmp, name, store, **kw):
    ctx = Context(config=make_config(tmp, name, kw.pop("psk", PSK), **kw), store=store,
                  admin=Admin())
    mod = tunnel_module.build(ctx)
    mod.start()
    return mod


def test_direct_tcp_and_udp_streams_and_half_close(tmp_path, echo):
    tport, uport = echo
    store_b = store_with("b", tport, uport)
    b = agent(tmp_path, "b", store_b)
    a = agent(tmp_path, "a", store_with("b", tport, uport))
    # a learns b's address the way it would from the Node object
    a.ctx.store.upsert("Node", Node(ObjectMeta("b"), addresses=(("InternalIP", "127.0.0.1"),)),
                       {})
    a.peers.servers.listen_port = b.node.listen_addr[1]
    try:
        sock = a.open_stream("b", "tcp", "127.0.0.1", tport, 5)
        blob = os.urandom(3 * 1024 * 1024)
        sender = gevent.spawn(lambda: (sock.sendall(blob), sock.shutdown(socket.SHUT_WR)))
        got = bytearray()
        while data := sock.recv(65536):
            got += data
        sender.join()
        assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
        sock.close()

        chan = a.open_datagram("b", "127.0.0.1", uport)
        for i in range(20):
            chan.send(b"d%d" % i)
            assert chan.recv() == b"echo:d%d" % i
        chan.close()

        view = a.view()
        assert [p["node"] for p in view] == ["b"] and view[0]["path"] == "direct"
        assert view[0]["bytes_out"] > len(blob)
        assert b.view()[0]["node"] == "a"
    finally:
        a.stop()
        b.stop()


def test_streams_to_addresses_that_are_not_local_endpoints_are_refused(tmp_path, echo):
    tport, uport = echo
    b = agent(tmp_path, "b", store_with("b", tport, uport))
    a = agent(tmp_path, "a", Store())
    a.ctx.store.upsert("Node", Node(ObjectMeta("b"), addresses=(("InternalIP", "127.0.0.1"),)),
                       {})
    a.peers.servers.listen_port = b.node.listen_addr[1]
    before = REFUSED.labels("not_local_endpoint").value
    try:
        # the admin port of b's host, a port that exists but is no endpoint
        with pytest.raises(UnavailableError, match="not an endpoint"):
            a.open_stream("b", "tcp", "127.0.0.1", b.node.listen_addr[1], 5)
        with pytest.raises(UnavailableError, match="not an endpoint"):
            a.open_stream("b", "tcp", "10.1.2.3", tport, 5)
        assert REFUSED.labels("not_local_endpoint").value == before + 2
    finally:
        a.stop()
        b.stop()


def start_server(tmp, psk=PSK, **kw):
    cfg = make_config(tmp, "srv", psk)
    for k, v in kw.items():
        setattr(cfg.server, k, v)
    server = Server(cfg)
    host, port = server.start()
    return server, f"{host}:{port}"


def test_relay_circuit_carries_streams_and_registration_reports_addresses(tmp_path, echo):
    tport, uport = echo
    server, addr = start_server(tmp_path)
    b = agent(tmp_path, "b", store_with("b", tport, uport), servers=[addr])
    # a cannot reach b directly: b registers no addresses a can use, and a knows no Node
    a = agent(tmp_path, "a", Store(), servers=[addr])
    b.peers.servers.local_addresses = lambda: []  # type: ignore[method-assign]
    try:
        from tests.netlab import wait_for
        wait_for(lambda: a.check() == "" and "b" in server.relay.registry, 10, what="links")
        server.relay.registry["b"].addrs = []
        server.relay.registry["b"].observed = "127.0.0.1:9"  # a closed port: direct fails
        sock = a.open_stream("b", "tcp", "127.0.0.1", tport, 8)
        sock.sendall(b"through the relay")
        assert sock.recv(100) == b"through the relay"
        sock.close()
        paths = {p["node"]: p["path"] for p in a.view()}
        assert paths["b"] == "relayed"
    finally:
        a.stop()
        b.stop()
        server.stop()


def test_wrong_psk_and_second_key_for_a_bound_name_are_refused(tmp_path, echo):
    tport, uport = echo
    server, addr = start_server(tmp_path)
    good = agent(tmp_path, "a", Store(), servers=[addr])
    from tests.netlab import wait_for
    try:
        wait_for(lambda: good.check() == "", 10, what="link up")
        bad_psk = agent(tmp_path, "x", Store(), servers=[addr],
                        psk=b"some other secret, long enough")
        gevent.sleep(1.0)
        assert bad_psk.check().startswith("no relay server reachable")
        assert "x" not in server.relay.registry
        # another key claiming the name "a" (a different state dir holds a different key)
        (tmp_path / "thief").mkdir()
        thief = agent(tmp_path / "thief", "a", Store(), servers=[addr])
        gevent.sleep(1.0)
        assert thief.check().startswith("no relay server reachable")
        assert server.node.bindings.key_of("a") == good.node.public_key.hex()
        for m in (bad_psk, thief):
            m.stop()
    finally:
        good.stop()
        server.stop()
