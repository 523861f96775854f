"""UDP forwarding: one session per client address, datagram boundaries kept.

A port's datagrams reach a ``UDPPort`` in one of two ways:

- ``TransparentUDPPort`` (with iptables, where TPROXY works): the transparent UDP socket of
  ``transparent.py`` passes on the first datagrams of each client with the service address
  it was sent to. The session binds a socket of its own to that address (``IP_TRANSPARENT``,
  ``transparent_socket``) and connects it to the client: a ``Front``. Replies leave from it,
  so from the ClusterIP, externalIP or node address and port the client asked, and the kernel
  delivers the client's later datagrams to it directly (TPROXY finds the connected socket
  first). Sessions are told apart by (client, service address): one client socket asking two
  services gets two sessions.
- ``UDPListener`` (``--no-iptables``, or no TPROXY): a socket per port, DNATed to; every reply
  is sent back from it, so conntrack rewrites its source to the service address.

The first datagram from a client opens a session: the balancer picks an endpoint and the
dialer opens a datagram channel (a connected UDP socket, or a tunnel channel). Each later
datagram goes to the same channel. Sessions close after ``udpIdleTimeout`` seconds without
traffic either way (default 60 s: DNS over UDP, QUIC and game traffic keep working;
EdgeMesh's 250 ms broke long exchanges), when their endpoint refuses (ICMP port unreachable),
or — beyond ``maxUDPSessions`` per port — the least recently used one is closed first.

A session to a local endpoint (``LocalSession``) reads its replies in a libev io watcher
callback on the hub's loop, as the TCP path does: a bounded batch of non-blocking ``recv`` per
wake-up, each sent on to the client; its ``Front`` (if any) is read the same way. It costs a
socket (two with a ``Front``), a watcher and one small object — no greenlet (whose saved stack
made up most of ~10 KiB per session). A session through the tunnel keeps a greenlet reading
its channel, whose ``recv`` blocks cooperatively, and one reading its ``Front``: sending into
a tunnel channel may wait. A ``UDPListener``'s receive loop is a greenlet for that reason too.
"""
from __future__ import annotations

import _socket
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import gevent
import gevent.socket

from edgemesh.dialer import DatagramChannel, Dialer, UDPChannel
from edgemesh.errors import UnavailableError
from edgemesh.meta.store import Backend
from edgemesh.proxy.lb import Balancer
from edgemesh.runtime import metrics, tasks
from edgemesh.runtime.logs import Once

log = logging.getLogger(__name__)

RECV_SIZE = 65535
OPENING_QUEUE = 16  # datagrams a new client may send while its session is being opened
MAX_OPENING = 256  # sessions being opened at once per service port (dials through the tunnel)
REPLY_BATCH = 16  # replies a local session forwards per wake-up before yielding to the loop
READ = 1
_once = Once()
SESSIONS = metrics.gauge("edgemesh_proxy_udp_sessions", "Active UDP sessions, by service port.",
                         ["service"])
DATAGRAMS = metrics.counter("edgemesh_proxy_udp_datagrams_total",
                            "Datagrams forwarded, by service port and direction.",
                            ["service", "direction"])
UDP_FAILURES = metrics.counter("edgemesh_proxy_udp_session_failures_total",
                               "UDP sessions that could not open or were refused.", ["service"])
DROPPED = metrics.counter("edgemesh_proxy_udp_dropped_total",
                          "Datagrams dropped: no endpoint could be opened, a queue or a "
                          "socket buffer was full.", ["service"])
CALLBACK_ERRORS = metrics.counter("edgemesh_proxy_udp_callback_errors_total",
                                  "Unexpected errors in the UDP reply callbacks (bugs).")


class LocalSession:
    """A session to a local endpoint: a connected non-blocking UDP socket whose replies are
    forwarded by an io watcher callback (see the module docstring)."""
    __slots__ = ("listener", "key", "client", "backend", "sock", "last", "watcher", "reply",
                 "front")

    def __init__(self, listener: UDPPort, key: Any, client: tuple[str, int], backend: Backend,
                 sock: _socket.socket, reply: Callable[[bytes], Any],
                 front: Front | None) -> None:
        self.listener = listener
        self.key = key
        self.client = client
        self.backend = backend
        self.sock = sock
        self.reply = reply
        self.front = front
        self.last = time.monotonic()
        self.watcher: Any = listener.loop.io(sock.fileno(), READ)
        self.watcher.start(self.on_readable)
        if front is not None:
            front.start(self, listener)

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except BlockingIOError:  # its socket buffer is full: dropped, as the network would
            DROPPED.labels(self.listener.name).inc()
        except OSError as e:  # ECONNREFUSED: an earlier datagram met a closed port
            raise UnavailableError(f"udp send: {e.strerror}") from e

    def on_readable(self) -> None:
        listener = self.listener
        sent = 0
        try:
            recv, reply = self.sock.recv, self.reply
            for _ in range(REPLY_BATCH):
                try:
                    data = recv(RECV_SIZE)
                except BlockingIOError:
                    break
                try:
                    reply(data)
                except BlockingIOError:
                    DROPPED.labels(listener.name).inc()
                    continue
                except OSError as e:  # the client side: not the endpoint's refusal
                    log.debug("udp session %s: %s", self.client, e)
                    listener.forget(self)
                    break
                sent += 1
        except ConnectionRefusedError:  # ICMP port unreachable from the endpoint
            UDP_FAILURES.labels(listener.name).inc()
            listener.forget(self)
        except OSError as e:
            log.debug("udp session %s: %s", self.client, e)
            listener.forget(self)
        except Exception:
            CALLBACK_ERRORS.inc()
            if _once(("udp-callback", listener.name)):
                log.exception("udp %s: reply callback failed", listener.name)
            listener.forget(self)
        if sent:
            listener.down.value += sent
            self.last = time.monotonic()

    def close(self) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.stop()  # and drops its callback: no session <-> watcher cycle remains
            watcher.close()
        self.sock.close()
        if self.front is not None:
            self.front.close()


class Session:
    """A session through the tunnel: a greenlet reads its channel's replies."""
    __slots__ = ("listener", "key", "client", "backend", "channel", "last", "reader", "reply",
                 "front")

    def __init__(self, listener: UDPPort, key: Any, client: tuple[str, int], backend: Backend,
                 channel: DatagramChannel, reply: Callable[[bytes], Any],
                 front: Front | None) -> None:
        self.listener = listener
        self.key = key
        self.client = client
        self.backend = backend
        self.channel = channel
        self.reply = reply
        self.front = front
        self.last = time.monotonic()
        self.reader = tasks.spawn("proxy-udp-session", self._replies)
        if front is not None:
            front.start(self, listener)

    def send(self, data: bytes) -> None:
        self.channel.send(data)

    def _replies(self) -> None:
        listener = self.listener
        try:
            while True:
                data = self.channel.recv()
                self.last = time.monotonic()
                try:
                    self.reply(data)
                except BlockingIOError:  # the client's side is full: dropped, as by a network
                    DROPPED.labels(listener.name).inc()
                    continue
                listener.down.value += 1
        except UnavailableError:
            UDP_FAILURES.labels(listener.name).inc()
        except OSError as e:
            log.debug("udp session %s: %s", self.client, e)
        finally:
            listener.forget(self)

    def close(self) -> None:
        self.channel.close()
        if self.front is not None:
            self.front.close()
        if self.reader is not gevent.getcurrent():
            self.reader.kill(block=False)


class Front:
    """The client side of a transparent session: a socket bound to the service address the
    client sent to and connected to the client, so replies leave from that address and the
    kernel (TPROXY's socket lookup) delivers the client's next datagrams to it directly.

    Datagrams read from it go to the session in an io watcher callback for a local endpoint,
    in a greenlet for a tunnel channel (whose ``send`` may wait)."""
    __slots__ = ("sock", "fd", "watcher", "reader")

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.watcher: Any = None
        self.reader: gevent.Greenlet | None = None

    def start(self, session: AnySession, port: UDPPort) -> None:
        if isinstance(session, LocalSession):
            self.watcher = port.loop.io(self.fd, READ)
            self.watcher.start(self._on_readable, session, port)
        else:
            self.reader = tasks.spawn("proxy-udp-front", self._read, session, port)

    def _on_readable(self, session: AnySession, port: UDPPort) -> None:
        try:
            for _ in range(REPLY_BATCH):
                try:
                    data = self.sock.recv(RECV_SIZE)
                except BlockingIOError:
                    return
                port.forward(session, data)
                if self.watcher is None:
                    return  # the session closed while forwarding
        except OSError as e:
            log.debug("udp session %s: %s", session.client, e)
            port.forget(session)
        except Exception:
            CALLBACK_ERRORS.inc()
            if _once(("udp-front", port.name)):
                log.exception("udp %s: client callback failed", port.name)
            port.forget(session)

    def _read(self, session: AnySession, port: UDPPort) -> None:
        try:
            while True:
                gevent.socket.wait_read(self.fd)
                try:
                    data = self.sock.recv(RECV_SIZE)
                except BlockingIOError:
                    continue
                port.forward(session, data)
        except OSError as e:
            log.debug("udp session %s: %s", session.client, e)
            port.forget(session)

    def close(self) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.stop()
            watcher.close()
        reader, self.reader = self.reader, None
        if reader is not None and reader is not gevent.getcurrent():
            reader.kill(block=False)
        self.sock.close()


class UDPPort:
    """A UDP service port's sessions, fed datagrams by ``datagram``: from a socket of its own
    (``UDPListener``), or by the transparent UDP listener (``TransparentUDPPort``)."""

    def __init__(self, dialer: Dialer, name: str, balancer: Balancer,
                 backends: Sequence[Backend], *, idle_timeout: float, max_sessions: int) -> None:
        self.dialer = dialer
        self.name = name
        self.balancer = balancer
        self.backends = backends
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.loop = gevent.get_hub().loop
        self.sessions: OrderedDict[Any, AnySession] = OrderedDict()
        # A new client's session is opened in a greenlet of its own: a dial through the tunnel
        # to an unreachable node may take seconds and must not stall the service's other
        # clients. Datagrams that arrive meanwhile wait here, boundedly, in order.
        self._opening: dict[Any, list[bytes]] = {}
        # metrics and the idle sweep start with the first session: most ports never see one
        self.up: Any = None
        self.down: Any = None
        self._sweeper: gevent.Greenlet | None = None

    def _first_session(self) -> None:
        name = self.name
        self.up = DATAGRAMS.labels(name, "upstream")
        self.down = DATAGRAMS.labels(name, "downstream")
        SESSIONS.labels(name).fn = lambda: len(self.sessions)
        self._sweeper = tasks.spawn_forever(f"proxy-udp-idle-{name}", self._sweep_once,
                                            backoff=min(self.idle_timeout / 4, 15.0))

    def update(self, balancer: Balancer, backends: Sequence[Backend]) -> None:
        self.balancer = balancer
        self.backends = backends

    def key(self, client: tuple[str, int], local: tuple[str, int]) -> Any:
        """What tells sessions apart: the client address (one service address per socket)."""
        return client

    def front(self, client: tuple[str, int],
              local: tuple[str, int]) -> tuple[Callable[[bytes], Any], Front | None]:
        """How replies reach ``client``, and the session's own client socket if it has one."""
        raise NotImplementedError

    def backends_for(self, local: tuple[str, int]) -> Sequence[Backend]:
        """The endpoints a new session to ``local`` chooses among: the port's (the Edge CNI's
        port has one per destination, ``podip.PodUDPPort``)."""
        return self.backends

    def datagram(self, data: bytes, client: tuple[str, int], local: tuple[str, int]) -> None:
        """A datagram from ``client`` to the service address ``local``."""
        key = self.key(client, local)
        session = self.sessions.get(key)
        if session is None:
            self._queue_for_new(key, client, local, data)
            return
        self.forward(session, data)

    def _queue_for_new(self, key: Any, client: tuple[str, int], local: tuple[str, int],
                       data: bytes) -> None:
        waiting = self._opening.get(key)
        if waiting is not None:
            if len(waiting) < OPENING_QUEUE:
                waiting.append(data)
            else:
                DROPPED.labels(self.name).inc()
        elif len(self._opening) >= MAX_OPENING:
            DROPPED.labels(self.name).inc()
        else:
            self._opening[key] = [data]
            tasks.spawn(f"proxy-udp-open-{self.name}", self._open_and_flush, key, client, local)

    def _open_and_flush(self, key: Any, client: tuple[str, int],
                        local: tuple[str, int]) -> None:
        try:
            session = self._open(key, client, local)
        finally:
            waiting = self._opening.pop(key, [])
        if session is None:
            DROPPED.labels(self.name).inc(len(waiting))
            return
        for data in waiting:
            self.forward(session, data)

    def forward(self, session: AnySession, data: bytes) -> None:
        """Send a client's datagram on to its session's endpoint."""
        if self.sessions.get(session.key) is not session:
            DROPPED.labels(self.name).inc()  # evicted or failed while its queue was flushed
            return
        session.last = time.monotonic()
        self.sessions.move_to_end(session.key)
        try:
            session.send(data)
            self.up.value += 1
        except UnavailableError:
            UDP_FAILURES.labels(self.name).inc()
            self.forget(session)

    def _open(self, key: Any, client: tuple[str, int],
              local: tuple[str, int]) -> AnySession | None:
        bkey = client[0] if self.balancer.wants_client_ip else None
        backends = self.backends_for(local)
        tried: list[Backend] = []
        while len(tried) < 3:
            backend = self.balancer.pick(backends, bkey, tried)
            if backend is None:
                return None
            tried.append(backend)
            try:
                channel = self.dialer.open_udp(backend)
            except UnavailableError:
                UDP_FAILURES.labels(self.name).inc()
                self.balancer.release(backend)
                continue
            try:
                reply, front = self.front(client, local)
            except OSError as e:  # the service address cannot be bound (taken, vanished)
                UDP_FAILURES.labels(self.name).inc()
                if _once(("udp-front", self.name, e.errno)):
                    log.warning("udp %s: cannot answer from %s:%d: %s", self.name, *local,
                                e.strerror)
                channel.close()
                self.balancer.release(backend)
                return None
            if self._sweeper is None:
                self._first_session()
            while len(self.sessions) >= self.max_sessions:
                self.forget(next(iter(self.sessions.values())))
            session = self._session(key, client, backend, channel, reply, front)
            self.sessions[key] = session
            return session
        return None

    def _session(self, key: Any, client: tuple[str, int], backend: Backend,
                 channel: DatagramChannel, reply: Callable[[bytes], Any],
                 front: Front | None) -> AnySession:
        if isinstance(channel, UDPChannel):
            # the dialer's connected socket, without gevent's wrapper (and its two watchers)
            family = channel.sock.family
            sock = _socket.socket(family, _socket.SOCK_DGRAM, 0, channel.sock.detach())
            sock.setblocking(False)
            return LocalSession(self, key, client, backend, sock, reply, front)
        return Session(self, key, client, backend, channel, reply, front)

    def forget(self, session: AnySession) -> None:
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
            self.balancer.release(session.backend)
            session.close()

    def _sweep_once(self) -> None:
        cutoff = time.monotonic() - self.idle_timeout
        for session in [s for s in self.sessions.values() if s.last < cutoff]:
            self.forget(session)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
        for session in list(self.sessions.values()):
            self.forget(session)
        SESSIONS.remove(self.name)


class UDPListener(UDPPort):
    """A UDP socket for one service port (DNATed to it), and its sessions; replies leave from
    it, and conntrack gives them the address the client sent to."""

    def __init__(self, dialer: Dialer, name: str, ip: str, balancer: Balancer,
                 backends: Sequence[Backend], *, idle_timeout: float, max_sessions: int,
                 port: int = 0) -> None:
        super().__init__(dialer, name, balancer, backends, idle_timeout=idle_timeout,
                         max_sessions=max_sessions)
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((ip, port))
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        # callbacks run in the hub and must never wait: they send on the raw (non-blocking)
        # socket under gevent's wrapper
        self.sendto = self.sock._sock.sendto  # type: ignore[attr-defined]
        self._server = tasks.spawn(f"proxy-udp-{name}", self._serve)

    def front(self, client: tuple[str, int],
              local: tuple[str, int]) -> tuple[Callable[[bytes], Any], Front | None]:
        sendto = self.sendto
        return (lambda data: sendto(data, client)), None

    def _serve(self) -> None:
        while True:
            try:
                data, client = self.sock.recvfrom(RECV_SIZE)
            except OSError as e:  # ICMP errors from our replies' clients surface here
                if self.sock.fileno() < 0:
                    return  # closed under us: a closed socket fails at once, never yields
                log.debug("udp %s recv: %s", self.name, e)
                continue
            self.datagram(data, client, self.address)

    def close(self) -> None:
        self._server.kill(block=False)
        super().close()
        self.sock.close()


class TransparentUDPPort(UDPPort):
    """A UDP service port fed by the transparent UDP listener (``transparent.py``): each
    session answers from its own ``Front`` socket bound to the address the client sent to."""
    kind = None

    def key(self, client: tuple[str, int], local: tuple[str, int]) -> Any:
        return client, local

    def front(self, client: tuple[str, int],
              local: tuple[str, int]) -> tuple[Callable[[bytes], Any], Front | None]:
        sock = transparent_socket(local)
        try:
            sock.connect(client)
        except OSError:
            sock.close()
            raise
        return sock.send, Front(sock)


IP_TRANSPARENT, IPV6_TRANSPARENT = 19, 75  # linux/in.h, linux/in6.h


def transparent_socket(local: tuple[str, int]) -> _socket.socket:
    """A non-blocking UDP socket bound to ``local`` whether or not the address is this
    host's (``IP_TRANSPARENT``, which needs CAP_NET_ADMIN), sharing the port with others."""
    v6 = ":" in local[0]
    sock = _socket.socket(_socket.AF_INET6 if v6 else _socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        if v6:
            sock.setsockopt(_socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(_socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind(local)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


AnySession = LocalSession | Session
