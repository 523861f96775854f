"""Upstream connections of the HTTP engine, kept alive per endpoint and watched while idle.

``UpstreamPool`` holds at most ``max_idle`` idle connections per endpoint. Each idle one
(``Pooled``) keeps a read watcher started: the endpoint closing it, or sending bytes nobody
asked for, removes it at once, so a request rarely meets a dead connection. The callback path
(``httpflow``) borrows a connection with its watcher and gives both back, so reusing a
connection costs no ``epoll_ctl``; the greenlet path takes the bare socket (checking it first
when a request cannot be sent twice) and puts it back.
"""
from __future__ import annotations

import socket
import time
from typing import Protocol

import gevent

from edgemesh.errors import UnavailableError
from edgemesh.meta.store import Backend
from edgemesh.runtime import metrics

UPSTREAM_DIALS = metrics.counter("edgemesh_http_upstream_dials_total",
                                 "Upstream connections opened by the HTTP layer, by outcome.",
                                 ["result"])
CHECK_AFTER = 1.0  # seconds idle after which a pooled connection is checked before reuse


class TcpDialer(Protocol):
    """What the pool needs of ``edgemesh.dialer.Dialer``."""

    def dial_tcp(self, backend: Backend, timeout: float | None = None) -> socket.socket: ...


class Pooled:
    """One idle upstream connection, watched while idle: the endpoint closing it (or sending
    bytes nobody asked for) removes it from the pool at once. The callback path borrows the
    watcher too, so a reused connection costs no ``epoll_ctl``."""
    __slots__ = ("pool", "backend", "sock", "watcher", "since", "on_idle")

    def __init__(self, pool: UpstreamPool, backend: Backend, sock: socket.socket) -> None:
        self.pool, self.backend, self.sock = pool, backend, sock
        self.since = 0.0
        self.on_idle = self._idle_readable
        self.watcher = pool.loop.io(sock.fileno(), 1)

    def _idle_readable(self) -> None:
        idle = self.pool._idle.get(self.backend)
        if idle is not None and self in idle:
            idle.remove(self)
        self.close()

    def close(self) -> None:
        self.watcher.stop()
        self.watcher.close()
        self.sock.close()


class UpstreamPool:
    """Idle keep-alive connections to endpoints, at most ``max_idle`` per endpoint."""

    def __init__(self, dialer: TcpDialer, max_idle: int = 256) -> None:
        self.dialer = dialer
        self.max_idle = max_idle
        self.loop = gevent.get_hub().loop
        self._idle: dict[Backend, list[Pooled]] = {}

    def take(self, backend: Backend, check: bool) -> socket.socket | None:
        """A pooled connection for the greenlet path, or None. With ``check`` (or after
        ``CHECK_AFTER`` idle seconds) it is first checked to be still open: a request that
        cannot be sent twice should not be sent on a connection the endpoint has closed."""
        idle = self._idle.get(backend)
        while idle:
            entry = idle.pop()
            entry.watcher.stop()
            entry.watcher.close()
            sock = entry.sock
            if not (check or time.monotonic() - entry.since > CHECK_AFTER) or _still_open(sock):
                return sock
            sock.close()
        return None

    def borrow(self, backend: Backend) -> Pooled | None:
        """A pooled connection for the callback path, its watcher still started."""
        idle = self._idle.get(backend)
        return idle.pop() if idle else None

    def dial(self, backend: Backend, timeout: float) -> socket.socket:
        try:
            sock = self.dialer.dial_tcp(backend, timeout)
        except UnavailableError:
            UPSTREAM_DIALS.labels("failed").inc()
            raise
        UPSTREAM_DIALS.labels("ok").inc()
        return sock

    def put(self, backend: Backend, sock: socket.socket) -> None:
        """Keep a connection the greenlet path is done with."""
        self.give_back(Pooled(self, backend, sock))

    def give_back(self, entry: Pooled) -> None:
        """Keep a connection (back from the callback path: its watcher may be started)."""
        idle = self._idle.get(entry.backend)
        if idle is None:
            idle = self._idle[entry.backend] = []
        if len(idle) >= self.max_idle:
            entry.close()
            return
        entry.since = time.monotonic()
        entry.watcher.start(entry.on_idle)
        idle.append(entry)

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def retain(self, backends: set[Backend]) -> None:
        """Close idle connections to endpoints that are gone."""
        for backend in [b for b in self._idle if b not in backends]:
            for entry in self._idle.pop(backend):
                entry.close()

    def close(self) -> None:
        self.retain(set())


def _still_open(sock: socket.socket) -> bool:
    """A pooled connection has not been closed (or written to) by the endpoint meanwhile."""
    sock.settimeout(0.0)  # gevent waits out EAGAIN on a socket with a timeout, even with DONTWAIT
    try:
        sock.recv(1, socket.MSG_PEEK)  # EOF, or bytes nobody asked for
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(None)
