"""The TCP and UDP data paths in-process on loopback: timeouts, retries, limits, no leaks.

These drive ``TCPProxy``/``TCPListener``/``UDPListener`` directly with real sockets on
127.0.0.1 (gevent is patched by conftest), so they need neither root nor namespaces.
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios

import gevent
import gevent.event
import gevent.queue
import pytest

from edgemesh.dialer import Dialer
from edgemesh.errors import UnavailableError
from edgemesh.meta.store import Backend
from edgemesh.proxy.lb import Balancer, LBSpec, Policy
from edgemesh.proxy.tcp import TCPListener, TCPProxy
from edgemesh.proxy.udp import UDPListener
from edgemesh.runtime import metrics


class Server:
    def __init__(self, sock: socket.socket, greenlet: gevent.Greenlet) -> None:
        self.sock, self.greenlet = sock, greenlet

    def close(self) -> None:
        self.greenlet.kill()
        self.sock.close()


def _echo_server() -> tuple[Server, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)

    def handle(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def serve() -> None:
        while True:
            conn, _ = srv.accept()
            gevent.spawn(handle, conn)
    return Server(srv, gevent.spawn(serve)), srv.getsockname()[1]


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: connects are refused
    return port


@pytest.fixture
def proxy():
    p = TCPProxy(Dialer("n1", connect_timeout=1.0), connect_timeout=1.0, idle_timeout=0.4,
                 max_connections=3)
    yield p
    p.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _counter(name: str, *labels: str) -> float:
    metric = metrics.REGISTRY.get(name)
    assert metric is not None
    return metric.labels(*labels).value  # type: ignore[attr-defined]


def test_refused_endpoints_are_skipped_and_bytes_flow(proxy: TCPProxy) -> None:
    srv, port = _echo_server()
    backends = [Backend("127.0.0.1", _dead_port()), Backend("127.0.0.1", port),
                Backend("127.0.0.1", _dead_port())]
    lst = TCPListener(proxy, "t/refused", "127.0.0.1",
                      Balancer(LBSpec(Policy.ROUND_ROBIN)), backends)
    before = _counter("edgemesh_proxy_endpoint_connect_failures_total", "t/refused")
    try:
        for i in range(6):
            with socket.create_connection(lst.address, timeout=5) as c:
                payload = os.urandom(200_000 + i)
                c.sendall(payload)
                c.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := c.recv(65536):
                    got += chunk
                assert got == payload
        # round robin sends 2 of 3 connections to a dead endpoint first: at least 4 failures
        after = _counter("edgemesh_proxy_endpoint_connect_failures_total", "t/refused")
        assert after - before >= 4
    finally:
        lst.close()
        srv.close()


def test_all_endpoints_dead_resets_the_client(proxy: TCPProxy) -> None:
    lst = TCPListener(proxy, "t/dead", "127.0.0.1", Balancer(LBSpec()),
                      [Backend("127.0.0.1", _dead_port())])
    try:
        with socket.create_connection(lst.address, timeout=5) as c:
            with pytest.raises(ConnectionResetError):  # RST, not a silent EOF
                c.recv(10)
    finally:
        lst.close()


def test_idle_connections_are_closed_and_nothing_leaks(proxy: TCPProxy) -> None:
    srv, port = _echo_server()
    lst = TCPListener(proxy, "t/idle", "127.0.0.1", Balancer(LBSpec()),
                      [Backend("127.0.0.1", port)])
    try:
        start = _fds()
        conns = [socket.create_connection(lst.address, timeout=5) for _ in range(3)]
        for c in conns:
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"
        # the fourth is over max_connections=3: closed at once
        extra = socket.create_connection(lst.address, timeout=5)
        assert extra.recv(10) == b""
        extra.close()
        for c in conns:  # idle_timeout 0.4 s: the sweeper closes them
            c.settimeout(5)
            assert c.recv(10) == b""
            c.close()
        gevent.sleep(0.1)
        assert not proxy.conns
        # sockets closed and pipes back in the pool (pooled pipes may stay open)
        assert _fds() - start <= 2 * len(proxy.pipes._free)
    finally:
        lst.close()
        srv.close()


def _udp_echo() -> tuple[Server, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            data, peer = s.recvfrom(65535)
            s.sendto(data, peer)
    return Server(s, gevent.spawn(serve)), s.getsockname()[1]


def test_udp_sessions_are_bounded_and_expire() -> None:
    srv, port = _udp_echo()
    lst = UDPListener(Dialer("n1", 1.0), "t/udp", "127.0.0.1", Balancer(LBSpec()),
                      [Backend("127.0.0.1", port)], idle_timeout=0.5, max_sessions=2)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        for i, c in enumerate(clients):
            c.settimeout(5)
            c.connect(lst.address)
            big = bytes([i]) * 60000  # one large datagram stays one datagram
            c.send(big)
            assert c.recv(65535) == big
            c.send(b"small")
            assert c.recv(65535) == b"small"
        assert len(lst.sessions) == 2  # the oldest of three was evicted
        assert clients[0].getsockname() not in lst.sessions
        gevent.sleep(1.0)  # idle 0.5 s + sweep
        assert len(lst.sessions) == 0
        clients[0].send(b"again")  # a new session starts transparently
        assert clients[0].recv(100) == b"again"
    finally:
        for c in clients:
            c.close()
        lst.close()
        srv.close()


class FakeTunnel:
    """Stands in for the tunnel module: streams are socketpairs served by an echo greenlet
    that prefixes the target it was asked for; datagram channels echo the same way."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, str, int]] = []

    def open_stream(self, node: str, protocol: str, ip: str, port: int,
                    timeout: float | None) -> socket.socket:
        self.asked.append((node, protocol, ip, port))
        if node == "down":
            raise ConnectionRefusedError("peer unreachable")
        ours, theirs = socket.socketpair()

        def serve() -> None:
            with theirs:
                theirs.sendall(f"{node}:{ip}:{port}\n".encode())
                while data := theirs.recv(65536):
                    theirs.sendall(data)
        gevent.spawn(serve)
        return ours

    def open_datagram(self, node: str, ip: str, port: int) -> "FakeChannel":
        self.asked.append((node, "udp", ip, port))
        return FakeChannel(node)


class FakeChannel:
    def __init__(self, node: str) -> None:
        self.node = node
        self.queue: gevent.queue.Queue[bytes] = gevent.queue.Queue()

    def send(self, data: bytes) -> None:
        self.queue.put(self.node.encode() + b" " + data)

    def recv(self) -> bytes:
        return self.queue.get()

    def close(self) -> None:
        pass


def test_remote_endpoints_go_through_the_tunnel(proxy: TCPProxy) -> None:
    tunnel = FakeTunnel()
    proxy.dialer.tunnel = tunnel
    backends = [Backend("10.0.0.9", 80, node_name="down"),
                Backend("172.17.0.2", 8080, node_name="n2")]
    lst = TCPListener(proxy, "t/remote", "127.0.0.1", Balancer(LBSpec()), backends)
    try:
        for _ in range(2):  # round robin starts once on the dead node: it is skipped
            with socket.create_connection(lst.address, timeout=5) as c:
                f = c.makefile("rb")
                assert f.readline() == b"n2:172.17.0.2:8080\n"
                c.sendall(b"through the tunnel")
                c.shutdown(socket.SHUT_WR)
                assert f.read() == b"through the tunnel"
        assert ("down", "tcp", "10.0.0.9", 80) in tunnel.asked
    finally:
        lst.close()
        proxy.dialer.tunnel = None


def test_local_endpoints_never_use_the_tunnel() -> None:
    dialer = Dialer("n1", 1.0)
    dialer.tunnel = FakeTunnel()
    assert dialer.is_local(Backend("127.0.0.1", 1, node_name="n1"))
    assert dialer.is_local(Backend("127.0.0.1", 1, node_name=""))
    assert not dialer.is_local(Backend("127.0.0.1", 1, node_name="n2"))
    with pytest.raises(UnavailableError):
        dialer.dial_tcp(Backend("127.0.0.1", _dead_port(), node_name="n1"))
    with pytest.raises(UnavailableError):
        dialer.dial_tcp(Backend("10.0.0.1", 80, node_name="down"))


def test_udp_to_a_remote_endpoint_uses_a_tunnel_channel() -> None:
    dialer = Dialer("n1", 1.0)
    dialer.tunnel = FakeTunnel()
    lst = UDPListener(dialer, "t/udp-remote", "127.0.0.1", Balancer(LBSpec()),
                      [Backend("172.17.0.3", 53, node_name="n3")], idle_timeout=5,
                      max_sessions=4)
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        c.settimeout(5)
        c.connect(lst.address)
        c.send(b"query")
        assert c.recv(100) == b"n3 query"
        assert dialer.tunnel.asked == [("n3", "udp", "172.17.0.3", 53)]
    finally:
        c.close()
        lst.close()


def test_a_slow_remote_udp_dial_does_not_stall_other_clients() -> None:
    """The dial for a new client's session (through the tunnel, maybe to an unreachable
    node) runs beside the service's receive loop: other clients keep being served, and the
    waiting client's datagrams are delivered, in order, once its session is open."""
    gate = gevent.event.Event()

    class GatedTunnel(FakeTunnel):
        def open_datagram(self, node: str, ip: str, port: int) -> FakeChannel:
            if node == "slow":
                gate.wait()
            return super().open_datagram(node, ip, port)

    srv, port = _udp_echo()
    dialer = Dialer("n1", 1.0)
    dialer.tunnel = GatedTunnel()
    lst = UDPListener(dialer, "t/udp-slow", "127.0.0.1", Balancer(LBSpec()),
                      [Backend("127.0.0.1", port, node_name="n1"),
                       Backend("172.17.0.9", 53, node_name="slow")],
                      idle_timeout=5, max_sessions=8)
    first, second = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    try:
        for c in (first, second):
            c.settimeout(10)
            c.connect(lst.address)
        first.send(b"one")  # round robin: the local echo
        assert first.recv(100) == b"one"
        second.send(b"a")  # the remote node: its dial waits on the gate
        second.send(b"b")
        first.send(b"two")  # served while the other session is still being opened
        with gevent.Timeout(10, AssertionError("a pending dial stalled the other client")):
            assert first.recv(100) == b"two"
        assert not lst.sessions.get(second.getsockname())
        gate.set()
        assert [second.recv(100), second.recv(100)] == [b"slow a", b"slow b"]
    finally:
        gate.set()
        for c in (first, second):
            c.close()
        lst.close()
        srv.close()


def _unread(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def test_pipe_with_bytes_is_never_lent_again(proxy: TCPProxy) -> None:
    # The endpoint closes at once; the client keeps writing. The proxy's write to the endpoint
    # then fails with bytes still in its pipe: that pipe must be dropped, not pooled, or the
    # next connection would receive this one's bytes.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def close_at_once() -> None:
        while True:
            conn, _ = srv.accept()
            conn.close()
    server = Server(srv, gevent.spawn(close_at_once))
    lst = TCPListener(proxy, "t/dirty", "127.0.0.1", Balancer(LBSpec()),
                      [Backend("127.0.0.1", srv.getsockname()[1])])
    try:
        for _ in range(5):
            with socket.create_connection(lst.address, timeout=5) as c:
                assert c.recv(10) == b""  # the endpoint's FIN, passed on
                try:
                    for _ in range(20):
                        c.sendall(b"x" * 65536)
                        gevent.sleep(0.01)
                except OSError:
                    pass  # reset by the proxy once its writes to the endpoint fail
            gevent.sleep(0.05)
        assert all(_unread(r) == 0 for r, _ in proxy.pipes._free)
    finally:
        lst.close()
        server.close()


@pytest.mark.parametrize("size", [100, 3_000_000])
def test_answer_and_close_reaches_the_client_whole(proxy: TCPProxy, size: int) -> None:
    # The endpoint answers and closes at once: the proxy sees the EOF right after the answer
    # (and sends answer and FIN together); a big answer must still arrive whole when the
    # client reads slowly, the EOF only after the last byte.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    answer = os.urandom(size)

    def answer_and_close() -> None:
        while True:
            conn, _ = srv.accept()
            conn.recv(100)
            conn.sendall(answer)
            conn.close()
    server = Server(srv, gevent.spawn(answer_and_close))
    lst = TCPListener(proxy, "t/answer", "127.0.0.1", Balancer(LBSpec()),
                      [Backend("127.0.0.1", srv.getsockname()[1])])
    try:
        for _ in range(3):
            with socket.create_connection(lst.address, timeout=5) as c:
                c.sendall(b"request")
                gevent.sleep(0.05)  # let the proxy's pipe and the client's buffer fill up
                got = bytearray()
                while chunk := c.recv(65536):
                    got += chunk
                assert bytes(got) == answer
        gevent.sleep(0.05)
        assert not proxy.conns
    finally:
        lst.close()
        server.close()
