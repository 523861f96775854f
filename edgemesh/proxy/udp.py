"""UDP forwarding: one session per client address, datagram boundaries kept.

A listener receives a service port's datagrams (DNATed to it). The first datagram from a client
address opens a session: the balancer picks an endpoint and the dialer opens a datagram channel
(a connected UDP socket, or a tunnel channel). Each later datagram from that address goes to the
same channel; every reply is sent back from the listener's socket, so conntrack rewrites its
source to the ClusterIP the client asked. Sessions close after ``udpIdleTimeout`` seconds
without traffic either way (default 60 s: DNS over UDP, QUIC and game traffic keep working;
EdgeMesh's 250 ms broke long exchanges), when their endpoint refuses (ICMP port unreachable),
or — beyond ``maxUDPSessions`` per port — the least recently used one is closed first.
"""
from __future__ import annotations

import logging
import socket
import time
from collections import OrderedDict

import gevent

from edgemesh.errors import UnavailableError
from edgemesh.meta.store import Backend
from edgemesh.proxy.dialer import DatagramChannel, Dialer
from edgemesh.proxy.lb import Balancer
from edgemesh.runtime import metrics, tasks

log = logging.getLogger(__name__)

RECV_SIZE = 65535
OPENING_QUEUE = 16  # datagrams a new client may send while its session is being opened
MAX_OPENING = 256  # sessions being opened at once per service port (dials through the tunnel)
SESSIONS = metrics.gauge("edgemesh_proxy_udp_sessions", "Active UDP sessions, by service port.",
                         ["service"])
DATAGRAMS = metrics.counter("edgemesh_proxy_udp_datagrams_total",
                            "Datagrams forwarded, by service port and direction.",
                            ["service", "direction"])
UDP_FAILURES = metrics.counter("edgemesh_proxy_udp_session_failures_total",
                               "UDP sessions that could not open or were refused.", ["service"])
DROPPED = metrics.counter("edgemesh_proxy_udp_dropped_total",
                          "Datagrams dropped: no endpoint could be opened.", ["service"])


class Session:
    __slots__ = ("listener", "client", "backend", "channel", "last", "reader")

    def __init__(self, listener: UDPListener, client: tuple[str, int], backend: Backend,
                 channel: DatagramChannel) -> None:
        self.listener = listener
        self.client = client
        self.backend = backend
        self.channel = channel
        self.last = time.monotonic()
        self.reader = tasks.spawn("proxy-udp-session", self._replies)

    def _replies(self) -> None:
        listener = self.listener
        try:
            while True:
                data = self.channel.recv()
                self.last = time.monotonic()
                listener.sock.sendto(data, self.client)
                listener.down.value += 1
        except UnavailableError:
            UDP_FAILURES.labels(listener.name).inc()
        except OSError as e:
            log.debug("udp session %s: %s", self.client, e)
        finally:
            listener.forget(self)

    def close(self) -> None:
        self.channel.close()
        if self.reader is not gevent.getcurrent():
            self.reader.kill(block=False)


class UDPListener:
    """A UDP socket for one service port, and its sessions."""

    def __init__(self, dialer: Dialer, name: str, ip: str, balancer: Balancer,
                 backends: list[Backend], *, idle_timeout: float, max_sessions: int,
                 port: int = 0) -> None:
        self.dialer = dialer
        self.name = name
        self.balancer = balancer
        self.backends = backends
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((ip, port))
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.sessions: OrderedDict[tuple[str, int], Session] = OrderedDict()
        # A new client's session is opened in a greenlet of its own: a dial through the tunnel
        # to an unreachable node may take seconds and must not stall the service's other
        # clients. Datagrams that arrive meanwhile wait here, boundedly, in order.
        self._opening: dict[tuple[str, int], list[bytes]] = {}
        self.up = DATAGRAMS.labels(name, "upstream")
        self.down = DATAGRAMS.labels(name, "downstream")
        SESSIONS.labels(name).fn = lambda: len(self.sessions)
        self._server = tasks.spawn(f"proxy-udp-{name}", self._serve)
        self._sweeper = tasks.spawn_forever(f"proxy-udp-idle-{name}", self._sweep_once,
                                            backoff=min(idle_timeout / 4, 15.0))

    def update(self, balancer: Balancer, backends: list[Backend]) -> None:
        self.balancer = balancer
        self.backends = backends

    def _serve(self) -> None:
        while True:
            try:
                data, client = self.sock.recvfrom(RECV_SIZE)
            except OSError as e:  # ICMP errors from our replies' clients surface here
                if self.sock.fileno() < 0:
                    return  # closed under us: a closed socket fails at once, never yields
                log.debug("udp %s recv: %s", self.name, e)
                continue
            session = self.sessions.get(client)
            if session is None:
                self._queue_for_new(client, data)
                continue
            self._forward(session, data)

    def _queue_for_new(self, client: tuple[str, int], data: bytes) -> None:
        waiting = self._opening.get(client)
        if waiting is not None:
            if len(waiting) < OPENING_QUEUE:
                waiting.append(data)
            else:
                DROPPED.labels(self.name).inc()
        elif len(self._opening) >= MAX_OPENING:
            DROPPED.labels(self.name).inc()
        else:
            self._opening[client] = [data]
            tasks.spawn(f"proxy-udp-open-{self.name}", self._open_and_flush, client)

    def _open_and_flush(self, client: tuple[str, int]) -> None:
        try:
            session = self._open(client)
        finally:
            waiting = self._opening.pop(client, [])
        if session is None:
            DROPPED.labels(self.name).inc(len(waiting))
            return
        for data in waiting:
            self._forward(session, data)

    def _forward(self, session: "Session", data: bytes) -> None:
        if self.sessions.get(session.client) is not session:
            DROPPED.labels(self.name).inc()  # evicted or failed while its queue was flushed
            return
        session.last = time.monotonic()
        self.sessions.move_to_end(session.client)
        try:
            session.channel.send(data)
            self.up.value += 1
        except UnavailableError:
            UDP_FAILURES.labels(self.name).inc()
            self.forget(session)

    def _open(self, client: tuple[str, int]) -> Session | None:
        key = client[0] if self.balancer.wants_client_ip else None
        tried: list[Backend] = []
        while len(tried) < 3:
            backend = self.balancer.pick(self.backends, key, tried)
            if backend is None:
                return None
            tried.append(backend)
            try:
                channel = self.dialer.open_udp(backend)
            except UnavailableError:
                UDP_FAILURES.labels(self.name).inc()
                self.balancer.release(backend)
                continue
            while len(self.sessions) >= self.max_sessions:
                self.forget(next(iter(self.sessions.values())))
            session = self.sessions[client] = Session(self, client, backend, channel)
            return session
        return None

    def forget(self, session: Session) -> None:
        if self.sessions.get(session.client) is session:
            del self.sessions[session.client]
            self.balancer.release(session.backend)
            session.close()

    def _sweep_once(self) -> None:
        cutoff = time.monotonic() - self.idle_timeout
        for session in [s for s in self.sessions.values() if s.last < cutoff]:
            self.forget(session)

    def close(self) -> None:
        self._server.kill(block=False)
        self._sweeper.kill(block=False)
        for session in list(self.sessions.values()):
            self.forget(session)
        self.sock.close()
        SESSIONS.remove(self.name)

