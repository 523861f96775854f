"""UDP sessions to local endpoints (reply callbacks on the hub's loop), in-process on loopback.

Each client address gets its own session and only its own replies; a burst of replies longer
than one wake-up's batch all arrives, in order; an expired, refused or closed session leaves no
socket behind (counted in /proc/self/fd, never by timing).
"""
from __future__ import annotations

import os
import socket

import gevent

from edgemesh.dialer import Dialer
from edgemesh.meta.store import Backend
from edgemesh.proxy.lb import Balancer, LBSpec
from edgemesh.proxy.udp import REPLY_BATCH, UDPListener
from edgemesh.runtime import metrics

BURST = 3 * REPLY_BATCH + 1


def _sockets_to(port: int) -> int:
    """Our open UDP sockets connected to 127.0.0.1:``port`` (the sessions' sockets)."""
    with open("/proc/self/net/udp", encoding="ascii") as f:
        inodes = {fields[9] for fields in (line.split() for line in list(f)[1:])
                  if fields[2] == f"0100007F:{port:04X}"}
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            ours.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile (the listing's own descriptor)
    return sum(f"socket:[{inode}]" in ours for inode in inodes)


def _sample(name: str, service: str, extra: str = "") -> float:
    prefix = f'{name}{{service="{service}"{extra}}} '
    for line in metrics.REGISTRY.render().splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def _echo() -> tuple[socket.socket, gevent.Greenlet]:
    """Echoes each datagram; ``burst`` is answered with ``BURST`` numbered datagrams."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            data, peer = s.recvfrom(65535)
            if data == b"burst":
                for i in range(BURST):
                    s.sendto(b"burst %d" % i, peer)
            else:
                s.sendto(data, peer)
    return s, gevent.spawn(serve)


def _wait_for(condition: object, what: str) -> None:
    with gevent.Timeout(10, AssertionError(f"never happened: {what}")):
        while not condition():  # type: ignore[operator]
            gevent.sleep(0.01)


def test_many_clients_get_their_own_replies_and_expired_sessions_close_sockets() -> None:
    srv, server = _echo()
    name = "t/udp-many"
    lst = UDPListener(Dialer("n1", 1.0), name, "127.0.0.1", Balancer(LBSpec()),
                      [Backend("127.0.0.1", srv.getsockname()[1])], idle_timeout=60,
                      max_sessions=100)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(40)]
    port = srv.getsockname()[1]
    try:
        for c in clients:
            c.settimeout(5)
            c.connect(lst.address)
        up0 = _sample("edgemesh_proxy_udp_datagrams_total", name, ',direction="upstream"')
        down0 = _sample("edgemesh_proxy_udp_datagrams_total", name, ',direction="downstream"')
        for i, c in enumerate(clients):  # all sent before any reply is read
            c.send(b"client %d" % i)
        for i, c in enumerate(clients):
            assert c.recv(100) == b"client %d" % i
        assert _sample("edgemesh_proxy_udp_sessions", name) == len(clients)
        assert _sockets_to(port) == len(clients)  # one socket per session
        clients[0].send(b"burst")  # more replies than one wake-up forwards
        assert [clients[0].recv(100) for _ in range(BURST)] == [b"burst %d" % i
                                                                  for i in range(BURST)]
        assert _sample("edgemesh_proxy_udp_datagrams_total", name,
                       ',direction="upstream"') - up0 == len(clients) + 1
        assert _sample("edgemesh_proxy_udp_datagrams_total", name,
                       ',direction="downstream"') - down0 == len(clients) + BURST

        for session in list(lst.sessions.values())[:30]:
            session.last -= 61  # idle for longer than udpIdleTimeout
        lst._sweep_once()
        assert len(lst.sessions) == 10
        assert _sample("edgemesh_proxy_udp_sessions", name) == 10
        assert _sockets_to(port) == 10  # the expired sessions' sockets are closed
        assert clients[1].getsockname() not in lst.sessions  # the least recently active
        clients[1].send(b"again")  # a new session starts transparently
        assert clients[1].recv(100) == b"again"
        assert _sockets_to(port) == 11
        lst.close()  # module stop: every session's socket closed
        assert _sockets_to(port) == 0
    finally:
        for c in clients:
            c.close()
        lst.close()
        server.kill()
        srv.close()


def test_a_refusing_endpoint_ends_its_session_and_the_listener_keeps_serving() -> None:
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens: the kernel answers ICMP port unreachable
    name = "t/udp-refused"
    lst = UDPListener(Dialer("n1", 1.0), name, "127.0.0.1", Balancer(LBSpec()),
                      [Backend("127.0.0.1", dead_port)], idle_timeout=60, max_sessions=10)
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv, server = _echo()
    try:
        c.settimeout(5)
        c.connect(lst.address)
        failures = _sample("edgemesh_proxy_udp_session_failures_total", name)
        c.send(b"hello")
        _wait_for(lambda: _sample("edgemesh_proxy_udp_session_failures_total", name)
                  > failures, "the refusal counted")
        assert not lst.sessions
        assert _sockets_to(dead_port) == 0  # the refused session's socket is closed
        lst.update(lst.balancer, [Backend("127.0.0.1", srv.getsockname()[1])])
        c.send(b"still serving")
        assert c.recv(100) == b"still serving"
    finally:
        c.close()
        lst.close()
        server.kill()
        srv.close()
