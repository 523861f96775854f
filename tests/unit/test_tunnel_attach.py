"""The proxy's TCP path through ``TunnelModule.attach_stream`` (no socketpair hop), in process.

Two agents' tunnel modules on loopback (as in test_tunnel_session) and the proxy's
``TCPProxy`` with the first agent as its tunnel: bytes both ways with checksums, half-closes
both ways, a reset from the endpoint, a refused stream moving on to the next endpoint, a client
reset and the idle sweep, each leaving no stream and no descriptor behind.
"""
from __future__ import annotations

import hashlib
import os
import socket
import struct

import gevent
import pytest

from edgemesh.dialer import Dialer
from edgemesh.meta.models import Node, ObjectMeta
from edgemesh.meta.store import Backend
from edgemesh.proxy.lb import Balancer, LBSpec
from edgemesh.proxy.tcp import BYTES, TCPListener, TCPProxy
from edgemesh.tunnel.policy import REFUSED
from tests.unit.test_tunnel_session import agent, store_with

BLOB = 2 * 1024 * 1024 + 12345
SEED_UP, SEED_DOWN = b"client->endpoint", b"endpoint->client"


def blob(seed: bytes) -> bytes:
    out = bytearray()
    block = hashlib.sha256(seed).digest()
    while len(out) < BLOB:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:BLOB])


def read_all(sock: socket.socket) -> bytes:
    got = bytearray()
    while data := sock.recv(262144):
        got += data
    return bytes(got)


class Endpoint:
    """A TCP endpoint whose behaviour the client picks with its first byte:
    C: read to EOF, answer the digest then a blob, close (the client half-closed first);
    S: send a blob, half-close, read to EOF, record its digest (the endpoint half-closed first);
    R: reset the connection at once."""

    def __init__(self) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(16)
        self.port = self.srv.getsockname()[1]
        self.digests: list[bytes] = []
        self.greenlet = gevent.spawn(self._loop)

    def _loop(self) -> None:
        while True:
            conn, _ = self.srv.accept()
            gevent.spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._answer(conn)
        except OSError:
            pass  # the client reset: expected in some tests
        finally:
            conn.close()

    def _answer(self, conn: socket.socket) -> None:
        mode = conn.recv(1)
        if mode == b"C":
            digest = hashlib.sha256(read_all(conn)).digest()
            conn.sendall(digest + blob(SEED_DOWN))
        elif mode == b"S":
            conn.sendall(blob(SEED_DOWN))
            conn.shutdown(socket.SHUT_WR)
            self.digests.append(hashlib.sha256(read_all(conn)).digest())
        elif mode == b"R":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self) -> None:
        self.greenlet.kill()
        self.srv.close()


@pytest.fixture
def pair(tmp_path):
    ep = Endpoint()
    b = agent(tmp_path, "b", store_with("b", ep.port, 9))
    a = agent(tmp_path, "a", store_with("b", ep.port, 9))
    a.ctx.store.upsert("Node", Node(ObjectMeta("b"), addresses=(("InternalIP", "127.0.0.1"),)),
                       {})
    a.peers.servers.listen_port = b.node.listen_addr[1]
    dialer = Dialer("a", connect_timeout=5.0)
    dialer.tunnel = a
    proxy = TCPProxy(dialer, connect_timeout=5.0, idle_timeout=60.0, max_connections=16)
    yield a, b, ep, proxy
    proxy.close()
    a.stop()
    b.stop()
    ep.close()


def listen(proxy: TCPProxy, backends: list[Backend]) -> TCPListener:
    return TCPListener(proxy, "t/attach", "127.0.0.1", Balancer(LBSpec()), backends)


def streams(mod) -> int:
    return sum(s.stream_count + len(s.streams) for s in mod.peers.table.all())


def settle(a, b, proxy: TCPProxy) -> None:
    """Wait until both agents hold no stream and the proxy no connection."""
    with gevent.Timeout(10):
        while streams(a) or streams(b) or proxy.conns:
            gevent.sleep(0.02)


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_bytes_both_ways_and_half_close_both_ways(pair) -> None:
    a, b, ep, proxy = pair
    lst = listen(proxy, [Backend("127.0.0.1", ep.port, node_name="b")])
    try:
        with socket.create_connection(lst.address, timeout=10) as c:  # warms the session
            c.sendall(b"C")
            c.shutdown(socket.SHUT_WR)
            assert read_all(c)[:32] == hashlib.sha256(b"").digest()
        settle(a, b, proxy)
        before = fds()
        assert not hasattr(proxy.dialer, "attach_stream")  # the tunnel offers it, not the dialer
        up = blob(SEED_UP)
        # the client half-closes first; the endpoint answers after its EOF
        with socket.create_connection(lst.address, timeout=10) as c:
            sender = gevent.spawn(lambda: (c.sendall(b"C" + up), c.shutdown(socket.SHUT_WR)))
            got = read_all(c)
            sender.get()
        assert got[:32] == hashlib.sha256(up).digest()
        assert hashlib.sha256(got[32:]).digest() == hashlib.sha256(blob(SEED_DOWN)).digest()
        # the endpoint half-closes first; the client keeps sending after its EOF
        with socket.create_connection(lst.address, timeout=10) as c:
            c.sendall(b"S")
            got = read_all(c)
            assert got == blob(SEED_DOWN)
            c.sendall(up)
            c.shutdown(socket.SHUT_WR)
            assert c.recv(1) == b""
        settle(a, b, proxy)
        with gevent.Timeout(10):  # the endpoint digests what it read once its reader wakes
            while not ep.digests:
                gevent.sleep(0.02)
        assert ep.digests == [hashlib.sha256(up).digest()]
        # the sending node used no socketpair: a's streams were attached, not pumped pairs
        assert fds() == before
    finally:
        lst.close()


def test_tunnel_bytes_count_in_proxy_bytes_total(pair) -> None:
    a, b, ep, proxy = pair
    lst = TCPListener(proxy, "t/attach-bytes", "127.0.0.1", Balancer(LBSpec()),
                      [Backend("127.0.0.1", ep.port, node_name="b")])
    up = blob(SEED_UP)
    try:
        with socket.create_connection(lst.address, timeout=10) as c:
            sender = gevent.spawn(lambda: (c.sendall(b"C" + up), c.shutdown(socket.SHUT_WR)))
            got = read_all(c)
            sender.get()
        settle(a, b, proxy)
    finally:
        lst.close()
    counted = {d: BYTES.labels("t/attach-bytes", d).value for d in ("upstream", "downstream")}
    assert counted == {"upstream": 1 + len(up), "downstream": len(got)}


def test_endpoint_reset_resets_the_client(pair) -> None:
    a, b, ep, proxy = pair
    lst = listen(proxy, [Backend("127.0.0.1", ep.port, node_name="b")])
    try:
        with socket.create_connection(lst.address, timeout=10) as c:
            c.sendall(b"R")
            with pytest.raises(ConnectionResetError):
                read_all(c)
        settle(a, b, proxy)
    finally:
        lst.close()


def test_refused_stream_moves_on_to_the_next_endpoint(pair) -> None:
    a, b, ep, proxy = pair
    refused = REFUSED.labels("not_local_endpoint").value
    # b's admin-less tunnel port is no endpoint of b: b refuses the stream (NOT_LOCAL)
    bad = Backend("127.0.0.1", b.node.listen_addr[1], node_name="b")
    lst = listen(proxy, [bad, Backend("127.0.0.1", ep.port, node_name="b")])
    try:
        for _ in range(2):  # round robin: one of the two connections starts on the bad one
            with socket.create_connection(lst.address, timeout=10) as c:
                c.sendall(b"C" + b"x" * 1000)
                c.shutdown(socket.SHUT_WR)
                assert read_all(c)[:32] == hashlib.sha256(b"x" * 1000).digest()
        assert REFUSED.labels("not_local_endpoint").value == refused + 1
        settle(a, b, proxy)
    finally:
        lst.close()


def test_client_reset_and_idle_close_end_the_stream(pair) -> None:
    a, b, ep, proxy = pair
    lst = listen(proxy, [Backend("127.0.0.1", ep.port, node_name="b")])
    try:
        c = socket.create_connection(lst.address, timeout=10)
        c.sendall(b"C" + b"y" * 100000)  # the endpoint waits for our EOF
        with gevent.Timeout(10):
            while not streams(b):
                gevent.sleep(0.02)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # RST
        settle(a, b, proxy)

        proxy.idle_timeout = 0.2
        with socket.create_connection(lst.address, timeout=10) as c:
            c.sendall(b"C")
            with gevent.Timeout(10):
                while not streams(b):
                    gevent.sleep(0.02)
            proxy._sweep_once()
            gevent.sleep(0.3)
            proxy._sweep_once()  # idle for longer than idle_timeout: closed
            with pytest.raises(ConnectionResetError):
                read_all(c)
        settle(a, b, proxy)
    finally:
        lst.close()
