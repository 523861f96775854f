"""TCP forwarding on libev watcher callbacks: accept, connect and pump without greenlets.

Why callbacks: a greenlet pair per connection reached about half of haproxy's new connections
per second here, callbacks on the hub's own watchers nearly all of it (docs/performance.md),
and an idle connection then costs two sockets and a few small objects, no stack and no buffer.

Per connection:
- accept (up to ``ACCEPT_BATCH`` per wake-up) → ``Balancer.pick`` → non-blocking connect. On
  loopback the handshake is over when ``connect()`` returns (``TCP_INFO`` says ESTABLISHED):
  pumping starts in the same callback. Otherwise a read+write watcher (reused for reading once
  connected) waits; ``SO_ERROR`` is asked only when it reports readable, as a failed connect
  always does. One ticker for all pending connects enforces ``connectTimeout``. A refused or
  timed-out connect releases the pick and tries the next endpoint, excluding the ones that
  failed, at most ``MAX_ATTEMPTS`` times, so a dead endpoint costs a client only latency. The
  client's first bytes wait in its socket meanwhile.
- endpoints on other nodes are dialled through ``Dialer.dial_tcp`` (the tunnel) in a short
  greenlet; the pumping is the same afterwards.
- each direction (``Flow``) waits for readability, then splices socket → pipe → socket. Pipes
  (1 MiB, ``F_SETPIPE_SZ``) are borrowed from a small pool only while bytes sit in them; an idle
  connection holds none. When the destination cannot take more, the flow stops reading and
  waits for writability (back-pressure).
- EOF on one side becomes ``shutdown(SHUT_WR)`` on the other (half-close); a reset or error
  aborts both sides, with RST towards the peer that is still there. After a short read from
  the endpoint one more read looks for its EOF: an endpoint that answers and closes then
  costs one wake-up, and its answer and our FIN leave in one segment (``SPLICE_F_MORE``).
- an idle sweep closes connections with no traffic for ``tcpIdleTimeout`` seconds.

Invariants: a pipe goes back to the pool only when empty (``Flow.pending`` counts what is in
it before any write is tried, so a failed write drops the pipe instead of lending another
connection its bytes); closing a connection breaks its conn/flow/watcher cycles, so its memory
is reused at once; io watchers of closed connections are reused (creating one costs an
``fcntl``), and accepted sockets inherit ``TCP_NODELAY`` from the listener.
Measured costs against haproxy (``bench/proxy.py``): docs/performance.md.
"""
from __future__ import annotations

import _socket
import fcntl
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import gevent

from edgemesh.dialer import Dialer
from edgemesh.errors import UnavailableError
from edgemesh.meta.store import Backend
from edgemesh.proxy.lb import Balancer
from edgemesh.runtime import metrics, tasks
from edgemesh.runtime.backoff import AcceptBackoff, is_resource_error
from edgemesh.runtime.logs import Once
from edgemesh.runtime.pump import F_SETPIPE_SZ, LINGER_RST, PIPE_SIZE

log = logging.getLogger(__name__)

READ, WRITE = 1, 2
ACCEPT_BATCH = 64
MAX_ATTEMPTS = 3
CHUNK = PIPE_SIZE  # one splice moves what the socket holds, up to a full pipe
READ_ROUNDS = 4  # splices per wake-up while reads come back full
POOL_KEEP = 32
WATCHERS_KEEP = 1024  # stopped io watchers kept for reuse: creating one costs an fcntl(F_GETFD)
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
SPLICE_EOF_FLAGS = SPLICE_FLAGS | os.SPLICE_F_MORE  # the last bytes before our FIN
_SHUT_WR = _socket.SHUT_WR
_SOL_SOCKET, _SO_ERROR = _socket.SOL_SOCKET, _socket.SO_ERROR
_STREAM, _TCP, _NODELAY = _socket.SOCK_STREAM, _socket.IPPROTO_TCP, _socket.TCP_NODELAY
_TCP_INFO, _ESTABLISHED = _socket.TCP_INFO, b"\x01"  # tcpi_state, the first byte of tcp_info
splice = os.splice
_once = Once()

CONNECTIONS = metrics.counter("edgemesh_proxy_connections_total",
                              "TCP connections accepted, by service port.", ["service"])
ACTIVE = metrics.gauge("edgemesh_proxy_active_connections", "TCP connections open now.")
BYTES = metrics.counter("edgemesh_proxy_bytes_total",
                        "Bytes forwarded, by service port and direction.",
                        ["service", "direction"])
CONNECT_FAILURES = metrics.counter("edgemesh_proxy_endpoint_connect_failures_total",
                                   "Failed connects to endpoints, by service port.",
                                   ["service"])
REJECTED = metrics.counter("edgemesh_proxy_rejected_connections_total",
                           "Connections closed at once: no endpoint, limit reached or "
                           "every attempt failed.", ["service", "reason"])
CALLBACK_ERRORS = metrics.counter("edgemesh_proxy_callback_errors_total",
                                  "Unexpected errors in the TCP data path (bugs).")
ACCEPT_PAUSES = metrics.counter("edgemesh_proxy_accept_pauses_total",
                                "Pauses of a TCP listener's accepting for lack of descriptors "
                                "or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM).", ["listener"])


class PipePool:
    """Empty pipes lent to flows while bytes are in flight; at most ``keep`` are kept idle."""

    def __init__(self, size: int = PIPE_SIZE, keep: int = POOL_KEEP) -> None:
        self.size = size
        self.keep = keep
        self._free: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError:
            pass  # above fs.pipe-max-size for an unprivileged user: the default still works
        return r, w

    def give(self, pipe: tuple[int, int], clean: bool = True) -> None:
        if clean and len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        while self._free:
            self.give(self._free.pop(), clean=False)


class Flow:
    """One direction of a connection: ``src`` → pipe → ``dst``.

    The hot path of the proxy: written flat, with locals, because every connection runs it
    several times (see the module docstring for the shape).
    """
    __slots__ = ("conn", "pool", "loop", "src", "dst", "src_fd", "dst_fd", "rw", "ww", "pipe",
                 "pending", "done", "counter", "peek_eof")

    def __init__(self, conn: Conn, src: Any, dst: Any, counter: Any,
                 watcher: Any = None) -> None:
        proxy = conn.proxy
        self.conn = conn
        self.pool = proxy.pipes
        self.loop = proxy.loop
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.rw = watcher or proxy.watcher(self.src_fd, READ)
        self.ww: Any = None
        self.pipe: tuple[int, int] | None = None
        self.pending = 0
        self.done = False
        self.counter = counter
        self.peek_eof = False  # set on the endpoint → client direction

    def start(self) -> None:
        self.rw.start(self.on_readable)

    def on_readable(self) -> None:
        try:
            pipe = self.pipe or self.pool.take()
            self.pipe = pipe
            src, wfd, rfd, dst = self.src_fd, pipe[1], pipe[0], self.dst_fd
            for _ in range(READ_ROUNDS):
                try:
                    n = splice(src, wfd, CHUNK, None, None, SPLICE_FLAGS)
                except BlockingIOError:
                    break
                if n == 0:
                    self._eof()
                    return
                self.counter.value += n
                pending = self.pending = self.pending + n  # stop() must see a dirty pipe
                flags = SPLICE_FLAGS
                if n < CHUNK and self.peek_eof:
                    # endpoints often answer and close at once: seeing the EOF now sends the
                    # answer and our FIN in one segment (MORE holds the bytes for shutdown)
                    # and saves a wake-up; the EOF stays readable if the write must wait
                    try:
                        m = splice(src, wfd, CHUNK, None, None, SPLICE_FLAGS)
                    except BlockingIOError:
                        m = -1
                    if m == 0:
                        flags = SPLICE_EOF_FLAGS
                    elif m > 0:
                        self.counter.value += m
                        pending = self.pending = pending + m
                        n = CHUNK  # more may follow: keep reading
                try:
                    while pending:
                        pending -= splice(rfd, dst, pending, None, None, flags)
                except BlockingIOError:
                    self.pending = pending
                    self._wait_writable()
                    return
                self.pending = 0
                if flags == SPLICE_EOF_FLAGS:
                    self._eof()
                    return
                if n < CHUNK:  # a short read emptied the socket: no syscall to learn it again
                    break
            if not self.pending:
                self.pool.give(pipe)
                self.pipe = None
            self.conn.last = self.loop.now()
        except OSError:
            self.conn.abort()
        except Exception:
            _callback_failed(self.conn)

    def _wait_writable(self) -> None:
        self.rw.stop()
        if self.ww is None:
            self.ww = self.conn.proxy.watcher(self.dst_fd, WRITE)
        self.ww.start(self.on_writable)

    def on_writable(self) -> None:
        try:
            pipe = self.pipe
            assert pipe is not None
            pending, rfd, dst = self.pending, pipe[0], self.dst_fd
            try:
                while pending:
                    pending -= splice(rfd, dst, pending, None, None, SPLICE_FLAGS)
            except BlockingIOError:
                self.pending = pending
                return
            self.pending = 0
            self.pool.give(pipe)
            self.pipe = None
            self.ww.stop()
            self.rw.start(self.on_readable)
            self.conn.last = self.loop.now()
        except OSError:
            self.conn.abort()
        except Exception:
            _callback_failed(self.conn)

    def _eof(self) -> None:
        self.rw.stop()
        if self.pipe is not None:
            self.pool.give(self.pipe)
            self.pipe = None
        self.done = True
        conn = self.conn
        flows = conn.flows
        if flows is not None:
            other = flows[1] if flows[0] is self else flows[0]
            if other.done:
                conn.close()  # both sides sent FIN: close() sends ours, no shutdown needed
                return
        try:
            self.dst.shutdown(_SHUT_WR)
        except OSError:
            conn.abort()

    def stop(self) -> None:
        release = self.conn.proxy.release_watcher
        release(self.rw)
        if self.ww is not None:
            release(self.ww)
        # break the flow ↔ watcher (callback) cycle: memory comes back at close, not at the
        # next full garbage collection
        self.rw = self.ww = None
        if self.pipe is not None:
            # bytes may still sit in it: never lend such a pipe again
            self.pool.give(self.pipe, clean=self.pending == 0)
            self.pipe = None


class Conn:
    """One proxied connection from accept to close."""
    __slots__ = ("proxy", "listener", "client", "client_ip", "server", "backend", "tried",
                 "flows", "last", "cw", "deadline", "closed")

    def __init__(self, proxy: TCPProxy, listener: TCPPort, client: Any,
                 client_ip: str) -> None:
        self.proxy = proxy
        self.listener = listener
        self.client = client
        self.client_ip = client_ip
        self.server: Any = None
        self.backend: Backend | None = None
        self.tried: list[Backend] | None = None  # endpoints that failed for this connection
        self.flows: tuple[Flow, Flow] | None = None
        self.last = proxy.loop.now()
        self.cw: Any = None
        self.deadline = 0.0  # while connecting: when the attempt times out
        self.closed = False

    # ---- connecting ---------------------------------------------------------------------------

    def connect_next(self) -> None:
        listener = self.listener
        balancer = listener.balancer
        tried = self.tried or ()
        if len(tried) >= MAX_ATTEMPTS:
            self._reject("endpoints failed")
            return
        key = self.client_ip if balancer.wants_client_ip else None
        backend = balancer.pick(listener.backends, key, tried)
        if backend is None:
            self._reject("endpoints failed" if tried else "no endpoints")
            return
        self.backend = backend
        proxy = self.proxy
        dialer = proxy.dialer
        if not dialer.is_local(backend):
            tasks.spawn("proxy-dial", self._dial_remote, backend)
            return
        try:
            server = self.server = dialer.start_connect(backend)
        except UnavailableError:
            self._connect_failed()
            return
        if server.getsockopt(_TCP, _TCP_INFO, 1) == _ESTABLISHED:
            # on loopback the handshake is done before connect() returns: pump at once
            # instead of a loop iteration (and two epoll_ctl) waiting for writability
            self._pump(server, proxy.watcher(server.fileno(), READ))
            return
        # read and write: a failed connect reports both (EPOLLERR|EPOLLHUP), a completed one
        # only writability unless the endpoint spoke first, so SO_ERROR is rarely asked
        cw = self.cw = proxy.watcher(server.fileno(), READ | WRITE)
        cw.start(self.on_connect_done, pass_events=True)
        self.deadline = proxy.loop.now() + proxy.connect_timeout
        proxy.connecting.add(self)

    def on_connect_done(self, events: int) -> None:
        try:
            self.proxy.connecting.discard(self)
            watcher, self.cw = self.cw, None
            watcher.stop()
            if events & READ and self.server.getsockopt(_SOL_SOCKET, _SO_ERROR):
                self.proxy.release_watcher(watcher)
                self._connect_failed()
            else:
                watcher.events = READ  # reused for the server → client flow
                self._pump(self.server, watcher)
        except Exception:
            _callback_failed(self)

    def on_connect_timeout(self) -> None:
        try:
            self._stop_connect_watchers()
            self._connect_failed()
        except Exception:
            _callback_failed(self)

    def _stop_connect_watchers(self) -> None:
        self.proxy.connecting.discard(self)
        if self.cw is not None:
            self.proxy.release_watcher(self.cw)
            self.cw = None

    def _connect_failed(self) -> None:
        CONNECT_FAILURES.labels(self.listener.name).inc()
        assert self.backend is not None
        self.listener.balancer.release(self.backend)
        if self.tried is None:
            self.tried = []
        self.tried.append(self.backend)
        self.backend = None
        if self.server is not None:
            self.server.close()
            self.server = None
        if not self.closed:
            self.connect_next()

    def _dial_remote(self, backend: Backend) -> None:
        # a tunnel that pumps the client socket itself saves the socketpair hop (dialer.py)
        attach = getattr(self.proxy.dialer.tunnel, "attach_stream", None)
        if attach is not None:
            self._attach_remote(attach, backend)
            return
        try:
            sock = self.proxy.dialer.dial_tcp(backend)
        except UnavailableError as e:
            log.debug("dial %s failed: %s", backend, e)
            self._connect_failed()
            return
        if self.closed:
            sock.close()
            return
        self._pump(sock)

    def _attach_remote(self, attach: Any, backend: Backend) -> None:
        """The tunnel takes over the pumping (``TunnelDialer.attach_stream``): it calls
        ``close`` when the stream is over and ``_moved`` as bytes move (the idle sweep and
        ``edgemesh_proxy_bytes_total``, as the local path's flows count);
        ``self.server`` becomes its handle (``close``/``setsockopt`` like a socket)."""
        try:
            handle = attach(backend.node_name, "tcp", backend.ip, backend.port, self.client,
                            self.proxy.dialer.connect_timeout, on_end=self.close,
                            on_bytes=self._moved)
        except (UnavailableError, OSError) as e:
            log.debug("tunnel to %s failed: %s", backend, e)
            if not self.closed:  # close() already released the pick
                self._connect_failed()
            return
        self.server = handle
        if self.closed:
            handle.close()

    def _moved(self, up: int, down: int) -> None:
        self.last = self.proxy.loop.now()
        counters = self.listener.counters
        if up:
            counters[0].value += up
        if down:
            counters[1].value += down

    # ---- pumping and closing ------------------------------------------------------------------

    def _pump(self, server: Any, server_watcher: Any = None) -> None:
        self.server = server
        up, down = self.listener.counters
        first = Flow(self, self.client, server, up)
        second = Flow(self, server, self.client, down, server_watcher)
        second.peek_eof = True
        self.flows = (first, second)
        first.rw.start(first.on_readable)
        second.rw.start(second.on_readable)
        # the client usually spoke first and its bytes are waiting: skip one loop iteration
        first.on_readable()

    def abort(self) -> None:
        """An error on either side: reset both."""
        for sock in (self.client, self.server):
            if sock is not None:
                try:
                    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, LINGER_RST)
                except OSError:
                    pass
        self.close()

    def _reject(self, reason: str) -> None:
        REJECTED.labels(self.listener.name, reason).inc()
        if _once((self.listener.name, reason)):
            log.warning("%s: closing client connection: %s", self.listener.name, reason)
        self.abort()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.cw is not None:
            self._stop_connect_watchers()
        flows = self.flows
        if flows is not None:
            flows[0].stop()
            flows[1].stop()
            self.flows = None  # and the conn ↔ flows cycle
        self.client.close()
        if self.server is not None:
            self.server.close()
        if self.backend is not None:
            self.listener.balancer.release(self.backend)
        self.proxy.conns.discard(self)


def _callback_failed(conn: Conn) -> None:
    CALLBACK_ERRORS.inc()
    log.exception("tcp proxy callback failed")
    try:
        conn.abort()
    except Exception:
        log.exception("abort failed")


class TCPProxy:
    """What every TCP listener shares: the loop, dialer, pipe pool and open connections."""

    def __init__(self, dialer: Dialer, connect_timeout: float, idle_timeout: float,
                 max_connections: int) -> None:
        self.loop = gevent.get_hub().loop
        self.dialer = dialer
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.pipes = PipePool()
        self.conns: set[Conn] = set()
        self.connecting: set[Conn] = set()
        self._watchers: list[Any] = []
        ACTIVE.fn = lambda: len(self.conns)
        # one ticker for every pending connect instead of a timer per connection
        self._connect_ticker = tasks.spawn_forever("proxy-tcp-connect-timeouts",
                                                   self._expire_connects, backoff=0.1)
        self._sweeper = tasks.spawn_forever("proxy-tcp-idle", self._sweep_once,
                                            backoff=min(idle_timeout / 4, 30.0))

    def watcher(self, fd: int, events: int) -> Any:
        """A stopped io watcher for ``fd``: a released one when there is one."""
        if self._watchers:
            w = self._watchers.pop()
            w.fd = fd
            w.events = events
            return w
        return self.loop.io(fd, events)

    def release_watcher(self, w: Any) -> None:
        """Stop ``w`` (which drops its callback) and keep it for reuse."""
        w.stop()
        if len(self._watchers) < WATCHERS_KEEP:
            self._watchers.append(w)
        else:
            w.close()

    def _sweep_once(self) -> None:
        cutoff = self.loop.now() - self.idle_timeout
        for conn in [c for c in self.conns if c.last < cutoff]:
            conn.close()

    def _expire_connects(self) -> None:
        now = self.loop.now()
        for conn in [c for c in self.connecting if c.deadline <= now]:
            conn.on_connect_timeout()

    def close(self) -> None:
        self._connect_ticker.kill()
        self._sweeper.kill()
        for conn in list(self.conns):
            conn.close()
        self.pipes.close()
        while self._watchers:
            self._watchers.pop().close()


class TCPPort:
    """One service port's share of the TCP path: its endpoints, balancer and counters. It owns
    no socket: an ``Acceptor`` (its own, or the transparent one every port shares) hands it
    each accepted connection with ``accept``."""
    kind: str | None = None  # "https" and "http" ports are subclasses (http_listen.py)

    def __init__(self, proxy: TCPProxy, name: str, balancer: Balancer,
                 backends: Sequence[Backend]) -> None:
        self.proxy = proxy
        self.name = name
        self.balancer = balancer
        self.backends = backends
        # metric children are made at the first connection: most of 10,000 ports see none
        self._counters: tuple[Any, Any] | None = None
        self._accepted: Any = None

    @property
    def counters(self) -> tuple[Any, Any]:
        """The port's (upstream, downstream) byte counters."""
        if self._counters is None:
            name = self.name
            self._counters = (BYTES.labels(name, "upstream"), BYTES.labels(name, "downstream"))
        return self._counters

    def update(self, balancer: Balancer, backends: Sequence[Backend]) -> None:
        self.balancer = balancer
        self.backends = backends

    def accept(self, client: Any, addr: tuple[Any, ...]) -> None:
        """Proxy an accepted, non-blocking client socket (closed here when over the limit)."""
        proxy = self.proxy
        if len(proxy.conns) >= proxy.max_connections:
            REJECTED.labels(self.name, "limit").inc()
            client.close()
            return
        if self._accepted is None:
            self._accepted = CONNECTIONS.labels(self.name)
        self._accepted.value += 1
        self._start(Conn(proxy, self, client, addr[0]))

    def _start(self, conn: Conn) -> None:
        """Begin proxying an accepted connection (``http_listen.TLSPort`` peeks first)."""
        self.proxy.conns.add(conn)
        conn.connect_next()

    def close(self) -> None:
        """Nothing to release: connections already proxied carry on."""


class Acceptor:
    """A listening TCP socket that accepts in batches on a libev watcher and hands each
    connection to ``dispatch(client, addr)``: one port's ``accept``, or the transparent
    listener's lookup of the original destination (``transparent.py``)."""

    def __init__(self, proxy: TCPProxy, ip: str, port: int,
                 dispatch: Callable[[Any, tuple[Any, ...]], None], name: str) -> None:
        self.proxy = proxy
        self.name = name
        self.dispatch = dispatch
        family = _socket.AF_INET6 if ":" in ip else _socket.AF_INET
        self.sock = _socket.socket(family, _socket.SOCK_STREAM)
        self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(_TCP, _NODELAY, 1)  # accepted sockets inherit it: no call each
        self.sock.bind((ip, port))
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self.family = family
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self._backoff = AcceptBackoff()
        self._resume: Any = None  # the timer of a pause, while paused
        self._watcher = proxy.loop.io(self.sock.fileno(), READ)
        self._watcher.start(self.on_acceptable)

    def on_acceptable(self) -> None:
        try:
            self._accept_batch()
        except Exception:
            CALLBACK_ERRORS.inc()
            log.exception("accept on %s failed", self.name)

    def _accept_batch(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = self.sock._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as e:
                if _once(("accept", e.errno)):
                    log.error("accept on %s: %s", self.name, e)
                if is_resource_error(e):
                    self._pause()
                return  # others (ECONNABORTED...): the next wake-up tries again
            self._backoff.reset()
            client = _socket.socket(self.family, _STREAM, 0, fd)
            client.setblocking(False)
            self.dispatch(client, addr)

    def _pause(self) -> None:
        """Out of descriptors: stop the level-triggered watcher (it would fire again at once,
        a CPU spin) and start it after a delay, as gevent's StreamServer does."""
        ACCEPT_PAUSES.labels(self.name).inc()
        self._watcher.stop()
        self._resume = self.proxy.loop.timer(self._backoff.delay())
        self._resume.start(self._unpause)

    def _unpause(self) -> None:
        self._resume.close()
        self._resume = None
        self._watcher.start(self.on_acceptable)

    def close(self) -> None:
        """Stop accepting; connections already proxied carry on."""
        if self._resume is not None:
            self._resume.stop()
            self._resume.close()
            self._resume = None
        self._watcher.stop()
        self._watcher.close()
        self.sock.close()


class TCPListener(TCPPort):
    """A service port with a listening socket of its own (``--no-iptables``, tests)."""

    def __init__(self, proxy: TCPProxy, name: str, ip: str, balancer: Balancer,
                 backends: Sequence[Backend], port: int = 0) -> None:
        super().__init__(proxy, name, balancer, backends)
        self.acceptor = Acceptor(proxy, ip, port, self.accept, name)
        self.sock = self.acceptor.sock
        self.address = self.acceptor.address

    def close(self) -> None:
        self.acceptor.close()
