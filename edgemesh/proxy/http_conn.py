"""What both execution paths of the HTTP engine share about one client connection.

``ConnState`` holds the client socket, its router, pool, limits, the bytes read ahead
(``buf``) and the current deadline; the callback path (``httpflow.Fast``) and the greenlet
path (``http_greenlet.Connection``, a ``ConnState``) take turns driving it, handing a request
over as a ``Resume``. One ``Watchdog`` enforces every connection's deadline. ``malformed``
counts and logs a message rejected as malformed, by who sent it and why.
"""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import gevent

from edgemesh.meta.store import Backend
from edgemesh.proxy.http_head import HeadError, RequestHead, ResponseHead
from edgemesh.proxy.http_pool import UpstreamPool
from edgemesh.proxy.http_router import Forward, HttpLimits, Router
from edgemesh.runtime import metrics, tasks
from edgemesh.runtime.logs import Once

log = logging.getLogger(__name__)
_once = Once()

MALFORMED = metrics.counter("edgemesh_http_malformed_total",
                            "Malformed HTTP messages rejected, by who sent them and why.",
                            ["sender", "cause"])
RECV_SIZE = 65536
CLOSED = object()  # what the callback path returns when the connection is over


def malformed(sender: str, error: HeadError, peer: str) -> None:
    """Count a malformed message from ``sender`` ("client" or "endpoint"); log the first of
    each cause (no traceback: it is the sender's fault, not ours)."""
    cause = getattr(error, "cause", "malformed")
    MALFORMED.labels(sender, cause).inc()
    if _once((sender, cause)):
        log.info("malformed message from %s %s (%s): %s; further ones are only counted "
                 "(edgemesh_http_malformed_total)", sender, peer, cause, error)


@dataclass(slots=True)
class Resume:
    """Where the callback path hands a request to the greenlet exchange."""
    head: RequestHead
    raw: bytes
    fwd: Forward
    started: float
    exclude: set[Backend]
    picked: Backend | None = None  # the endpoint already chosen (and not yet released)
    # set once the response head was read on the callback path:
    backend: Backend | None = None
    upstream: socket.socket | None = None
    response: tuple[ResponseHead, bytes, bytes] | None = None


class ConnState:
    """One client connection as both paths see it."""
    __slots__ = ("client", "client_ip", "router", "pool", "limits", "buf", "deadline", "fast",
                 "linger")

    def __init__(self, client: socket.socket, client_ip: str, router: Router,
                 pool: UpstreamPool, limits: HttpLimits) -> None:
        self.client = client
        self.client_ip = client_ip
        self.router = router
        self.pool = pool
        self.limits = limits
        self.buf = b""  # bytes from the client not yet forwarded
        self.deadline = 0.0  # when the current phase times out (see Watchdog)
        self.fast: Any = None  # the callback path while it drives the connection
        self.linger = False  # request body bytes may still come: lingering close

    def expire(self) -> None:
        """The current phase ran out of time (called by the watchdog)."""
        raise NotImplementedError


class Watchdog:
    """Enforces every connection's current deadline from one greenlet.

    Each connection sets ``deadline`` (monotonic seconds, 0: none) as it moves between phases;
    this sweep calls ``expire()`` on those past theirs. Precision is a quarter of the shortest
    timeout in use (at most a second).
    """

    def __init__(self) -> None:
        self.conns: set[ConnState] = set()
        self.tick = 1.0
        self._greenlet: object = None

    def add(self, conn: ConnState) -> None:
        limits = conn.limits
        shortest = min(limits.head_timeout, limits.idle_timeout, limits.body_timeout,
                       limits.response_timeout)
        self.tick = min(self.tick, max(0.02, shortest / 4))
        self.conns.add(conn)
        if self._greenlet is None:
            self._greenlet = tasks.spawn_forever("http-deadlines", self._sweep, backoff=0)

    def _sweep(self) -> None:
        gevent.sleep(self.tick)
        now = time.monotonic()
        for conn in [c for c in self.conns if 0 < c.deadline < now]:
            conn.expire()


WATCHDOG = Watchdog()


def send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    """``sock.sendall(data)``, trying one plain non-blocking send first: gevent's sendall asks
    the kernel for the send buffer size on every call, which shows on small responses."""
    try:
        sent = sock._sock.send(data)  # type: ignore[attr-defined]
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def shutdown(sock: Any, how: int = socket.SHUT_RDWR) -> None:
    """``sock.shutdown(how)``, ignoring a socket already closed or reset."""
    if sock is not None:
        try:
            sock.shutdown(how)
        except OSError:
            pass
