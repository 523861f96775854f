"""Per-request HTTP/1.1 proxying on a service port: the thin I/O shell around the sans-IO parts.

An http port is spliced like TCP unless its balancing needs to see requests: a DestinationRule
``consistentHash`` on a header, cookie or query parameter, or ``modules.edgeProxy.perRequestHTTP``
(``wants_per_request``). Then ``serve_connection`` handles the client connection:

- each request head is parsed (``http_head``, bounded in size and field count, within
  ``head_timeout`` of its first byte; an idle keep-alive connection is closed after
  ``idle_timeout``), its key taken (header, cookie, query parameter or source IP), an endpoint
  picked by the port's balancer, and a pooled upstream connection to it reused or dialled;
- the head and body go upstream as the client sent them (``http_body`` finds where the body
  ends: content-length, chunked); the response head is parsed for framing only, and the response
  goes back byte for byte, with one ``Set-Cookie`` line added when cookie persistence chose an
  endpoint for a request without the cookie (Istio/Envoy semantics: the cookie value is hashed on
  the ring, so later requests carrying it stick to the same endpoint);
- ``Expect: 100-continue`` waits for the endpoint's ``100`` before the body moves;
- ``Upgrade`` (WebSocket) requests are routed like any request; after ``101`` both directions
  are spliced until either side closes;
- failures answer with a short text naming the service: 503 no endpoints, 502 endpoints
  unreachable or a broken response, 504 no response head within ``response_timeout``;
  malformed requests get 400 (431 oversized, 501 unknown transfer coding). After an error the
  connection is closed.

Upstream connections are pooled per endpoint (``UpstreamPool``, at most ``max_idle`` idle ones
each); a pooled connection that turns out closed is retried once on a fresh one for requests
without a body, and one is checked before reuse when the request has a body.

Cost, measured (``bench/http.py``): a small keep-alive request costs ~45 µs of CPU here against
haproxy's ~15 µs; a bare greenlet relay that parses nothing already costs ~30 µs, so this
design is bounded near half of haproxy per core. Deadlines are enforced by one watchdog
greenlet rather than per-call socket timeouts (which arm a timer on every blocking read), and
responses are parsed for framing only. The next step would be libev callbacks for the common
bodiless request, as ``tcp.py`` does for splicing.
"""
from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import gevent

from edgemesh.errors import UnavailableError
from edgemesh.meta.istio import HttpCookie
from edgemesh.meta.models import AppProtocol
from edgemesh.meta.store import Backend
from edgemesh.proxy.http_body import BodyTracker
from edgemesh.proxy.http_head import (
    Framing,
    HeadError,
    HeadLimits,
    RequestHead,
    ResponseHead,
    head_end,
    parse_request_head,
    parse_response_head,
)
from edgemesh.proxy.lb import Balancer, HashKey, LBSpec
from edgemesh.runtime import metrics, tasks
from edgemesh.runtime.logs import Once

log = logging.getLogger(__name__)
_once = Once()

REQUESTS = metrics.counter("edgemesh_http_requests_total",
                           "HTTP requests proxied per request, by service port and status.",
                           ["service", "code"])
DURATION = metrics.histogram("edgemesh_http_request_duration_seconds",
                             "From a request head read to its response's last byte sent.",
                             ["service"])
MALFORMED = metrics.counter("edgemesh_http_malformed_total",
                            "Malformed HTTP messages rejected, by who sent them.", ["sender"])
UPSTREAM_DIALS = metrics.counter("edgemesh_http_upstream_dials_total",
                                 "Upstream connections opened by the HTTP layer, by outcome.",
                                 ["result"])

RECV_SIZE = 65536
CHECK_AFTER = 1.0  # seconds idle after which a pooled connection is checked before reuse
_HTTP_KEYS = (HashKey.HTTP_HEADER, HashKey.HTTP_COOKIE, HashKey.HTTP_QUERY)


@dataclass(frozen=True)
class HttpLimits:
    """Bounds and timeouts (seconds) of the per-request proxy."""
    head: HeadLimits = HeadLimits()
    head_timeout: float = 30.0  # first byte of a request head → its end (slow clients)
    idle_timeout: float = 120.0  # a keep-alive connection waiting for its next request
    body_timeout: float = 60.0  # longest pause inside a body, either direction
    response_timeout: float = 60.0  # request sent → response head read, else 504
    connect_timeout: float = 5.0
    connect_attempts: int = 3  # endpoints tried before answering 502
    tunnel_idle_timeout: float = 3600.0  # an upgraded (WebSocket) connection with no traffic


@dataclass
class HttpPort:
    """One http service port, as the per-request proxy needs it."""
    name: str  # "namespace/service:port", for error texts, logs and metrics
    balancer: Balancer
    backends: Callable[[], Sequence[Backend]]  # the current endpoints (read per request)
    cookie: HttpCookie | None = None  # cookie persistence settings from the DestinationRule
    _codes: dict[int, metrics.Counter] = field(default_factory=dict, repr=False)
    _duration: metrics.Histogram | None = field(default=None, repr=False)

    def count(self, code: int, started: float) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = REQUESTS.labels(self.name, str(code))  # type: ignore[assignment]
        child.inc()
        if self._duration is None:
            self._duration = DURATION.labels(self.name)  # type: ignore[assignment]
        self._duration.observe(time.monotonic() - started)  # type: ignore[union-attr]


def wants_per_request(app: AppProtocol, spec: LBSpec, per_request_http: bool) -> bool:
    """True when an http port must be balanced per request rather than spliced per connection."""
    return app is AppProtocol.HTTP and (per_request_http or spec.hash_key in _HTTP_KEYS)


class TcpDialer(Protocol):
    """What the pool needs of ``edgemesh.proxy.dialer.Dialer``."""

    def dial_tcp(self, backend: Backend, timeout: float | None = None) -> socket.socket: ...


class UpstreamPool:
    """Idle keep-alive connections to endpoints, at most ``max_idle`` per endpoint."""

    def __init__(self, dialer: TcpDialer, max_idle: int = 256) -> None:
        self.dialer = dialer
        self.max_idle = max_idle
        self._idle: dict[Backend, list[tuple[socket.socket, float]]] = {}

    def take(self, backend: Backend, check: bool) -> socket.socket | None:
        """A pooled connection, or None. With ``check`` (or after ``CHECK_AFTER`` idle
        seconds) it is first checked to be still open: a request that cannot be sent twice
        should not be sent on a connection the endpoint has closed meanwhile."""
        idle = self._idle.get(backend)
        while idle:
            sock, since = idle.pop()
            if not (check or time.monotonic() - since > CHECK_AFTER) or _still_open(sock):
                return sock
            sock.close()
        return None

    def dial(self, backend: Backend, timeout: float) -> socket.socket:
        try:
            sock = self.dialer.dial_tcp(backend, timeout)
        except UnavailableError:
            UPSTREAM_DIALS.labels("failed").inc()
            raise
        UPSTREAM_DIALS.labels("ok").inc()
        return sock

    def put(self, backend: Backend, sock: socket.socket) -> None:
        idle = self._idle.setdefault(backend, [])
        if len(idle) >= self.max_idle:
            sock.close()
        else:
            idle.append((sock, time.monotonic()))

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def retain(self, backends: set[Backend]) -> None:
        """Close idle connections to endpoints that are gone."""
        for backend in [b for b in self._idle if b not in backends]:
            for sock, _ in self._idle.pop(backend):
                sock.close()

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


class _ClientGone(Exception):
    """The client closed, reset or stalled; nothing more can be said to it."""


class _Failed(Exception):
    """The exchange failed before any response byte reached the client; answer ``status``."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


_REASONS = {400: b"Bad Request", 405: b"Method Not Allowed", 431:
            b"Request Header Fields Too Large", 501: b"Not Implemented", 502: b"Bad Gateway",
            503: b"Service Unavailable", 504: b"Gateway Timeout"}


def error_response(status: int, text: str) -> bytes:
    """A complete ``Connection: close`` response with a one-line text body."""
    body = (text + "\n").encode("utf-8", "replace")
    return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (
                status, _REASONS.get(status, b"Error"), len(body)) + body)


def set_cookie_line(cookie: HttpCookie, value: str) -> bytes:
    """The ``Set-Cookie`` field line Envoy writes for a generated hash cookie."""
    parts = [f'{cookie.name}="{value}"']
    if cookie.ttl > 0:
        parts.append(f"Max-Age={int(cookie.ttl)}")
    parts.append(f"Path={cookie.path or '/'}")
    parts.append("HttpOnly")
    return b"Set-Cookie: " + "; ".join(parts).encode("latin-1") + b"\r\n"


def cookie_value(head: RequestHead, name: str) -> str | None:
    """The value of cookie ``name`` in the request's Cookie fields (quotes removed)."""
    wanted = name.encode("latin-1")
    for n, v in head.headers:
        if n.lower() != b"cookie":
            continue
        for pair in v.split(b";"):
            k, eq, val = pair.strip().partition(b"=")
            if eq and k == wanted:
                return val.strip(b'"').decode("latin-1")
    return None


def query_value(target: bytes, name: str) -> str | None:
    """The raw value of query parameter ``name`` in a request target."""
    _, q, query = target.partition(b"?")
    if not q:
        return None
    wanted = name.encode("latin-1")
    for pair in query.split(b"#", 1)[0].split(b"&"):
        k, _, val = pair.partition(b"=")
        if k == wanted:
            return val.decode("latin-1")
    return None


def request_key(spec: LBSpec, head: RequestHead, client_ip: str) -> str | None:
    """The balancing key of a request under ``spec`` (None: no key, plain policy)."""
    kind = spec.hash_key
    if kind is HashKey.HTTP_HEADER:
        value = head.header(spec.hash_name.lower().encode("latin-1"))
        return value.decode("latin-1") if value is not None else None
    if kind is HashKey.HTTP_COOKIE:
        return cookie_value(head, spec.hash_name)
    if kind is HashKey.HTTP_QUERY:
        return query_value(head.target, spec.hash_name)
    if kind is HashKey.SOURCE_IP or spec.affinity_timeout > 0:
        return client_ip
    return None


class _Watchdog:
    """Enforces every connection's current deadline from one greenlet.

    A gevent socket timeout arms a timer on every blocking call, which costs more than the
    rest of a small request; instead each connection sets ``deadline`` (monotonic seconds, 0:
    none) as it moves between phases, and this sweep shuts down the sockets of connections
    past theirs, so the blocked call returns at once. Precision is a quarter of the shortest
    timeout in use (at most a second).
    """

    def __init__(self) -> None:
        self.conns: set[_Connection] = set()
        self.tick = 1.0
        self._greenlet: object = None

    def add(self, conn: _Connection) -> None:
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


_WATCHDOG = _Watchdog()


def serve_connection(client: socket.socket, client_addr: tuple[str, int], port: HttpPort,
                     pool: UpstreamPool, limits: HttpLimits = HttpLimits()) -> None:
    """Proxy one client connection request by request until either side ends it; closes it."""
    conn = _Connection(client, client_addr[0], port, pool, limits)
    _WATCHDOG.add(conn)
    try:
        conn.run()
    finally:
        _WATCHDOG.conns.discard(conn)
        client.close()


def send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    """``sock.sendall(data)``, trying one plain non-blocking send first: gevent's sendall asks
    the kernel for the send buffer size on every call, which shows on small responses."""
    try:
        sent = sock._sock.send(data)  # type: ignore[attr-defined]
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def _shutdown(sock: socket.socket | None) -> None:
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Connection:
    __slots__ = ("client", "client_ip", "port", "pool", "limits", "buf", "deadline",
                 "upstream", "awaiting_head", "expired")

    def __init__(self, client: socket.socket, client_ip: str, port: HttpPort,
                 pool: UpstreamPool, limits: HttpLimits) -> None:
        self.client = client
        self.client_ip = client_ip
        self.port = port
        self.pool = pool
        self.limits = limits
        self.buf = b""  # bytes from the client not yet forwarded
        self.deadline = 0.0  # when the current phase times out (see _Watchdog)
        self.upstream: socket.socket | None = None  # the endpoint of the request in flight
        self.awaiting_head = False  # waiting for the endpoint's response head
        self.expired = False

    def expire(self) -> None:
        """The current phase ran out of time: unblock whoever waits (see _Watchdog)."""
        self.expired = True
        self.deadline = 0.0
        _shutdown(self.upstream)
        if not self.awaiting_head:  # then the client still gets its 504
            _shutdown(self.client)

    def run(self) -> None:
        try:
            while True:
                raw = self._read_request_head()
                if raw is None:
                    return
                started = time.monotonic()
                try:
                    head = parse_request_head(raw, self.limits.head)
                except HeadError:
                    MALFORMED.labels("client").inc()
                    raise
                if not self._exchange(head, raw, started):
                    return
        except HeadError as e:
            if _once(("client", str(e))):
                log.info("%s: bad request from %s: %s", self.port.name, self.client_ip, e)
            self._answer(e.status, f"bad request: {e}")
        except _ClientGone:
            pass

    # ---- the client side ----------------------------------------------------------------------

    def _recv_client(self, timeout: float) -> bytes:
        self.deadline = time.monotonic() + timeout
        try:
            return self.client.recv(RECV_SIZE)
        except OSError as e:
            raise _ClientGone(str(e)) from None

    def _read_request_head(self) -> bytes | None:
        """The next request head's bytes, or None when the client closed between requests."""
        limits = self.limits
        buf = self.buf
        if not buf:
            buf = self._recv_client(limits.idle_timeout)
            if not buf:
                return None
        self.deadline = time.monotonic() + limits.head_timeout
        while True:
            end = head_end(buf, limits.head)
            if end >= 0:
                self.buf = buf[end:]
                return buf[:end]
            try:
                data = self.client.recv(RECV_SIZE)  # under the head's deadline, not per read
            except OSError as e:
                raise _ClientGone(str(e)) from None
            if not data:
                raise _ClientGone("closed inside a request head")
            buf += data

    def _send_client(self, data: bytes | memoryview) -> None:
        self.deadline = time.monotonic() + self.limits.body_timeout
        try:
            send_all(self.client, data)
        except OSError as e:
            raise _ClientGone(str(e)) from None

    def _answer(self, status: int, text: str) -> None:
        try:
            self.client.sendall(error_response(status, text))
        except OSError:
            pass

    # ---- one request ---------------------------------------------------------------------------

    def _exchange(self, head: RequestHead, raw: bytes, started: float) -> bool:
        """Proxy one request and its response; True if the client connection may go on."""
        port = self.port
        key = request_key(port.balancer.spec, head, self.client_ip)
        new_cookie = None
        if port.cookie is not None and key is None:
            key = new_cookie = secrets.token_hex(8)
        try:
            backend, upstream, fresh = self._connect(key, head.framing is not Framing.NONE)
        except _Failed as e:
            port.count(e.status, started)
            self._answer(e.status, e.text)
            return False
        try:
            return self._forward(head, raw, backend, upstream, fresh, new_cookie, started)
        finally:
            port.balancer.release(backend)

    def _connect(self, key: str | None, has_body: bool) -> tuple[Backend, socket.socket, bool]:
        port, limits = self.port, self.limits
        backends = port.backends()
        if not backends:
            raise _Failed(503, f"no endpoints available for service {port.name}")
        exclude: set[Backend] = set()
        errors = []
        for _ in range(limits.connect_attempts):
            backend = port.balancer.pick(backends, key, exclude)
            if backend is None:
                break
            sock = self.pool.take(backend, has_body)
            if sock is not None:
                return backend, sock, False
            try:
                return backend, self.pool.dial(backend, limits.connect_timeout), True
            except UnavailableError as e:
                port.balancer.release(backend)
                exclude.add(backend)
                errors.append(str(e))
        if _once(("unreachable", port.name)):
            log.warning("%s: endpoints unreachable: %s", port.name, "; ".join(errors))
        raise _Failed(502, f"cannot reach any endpoint of service {port.name}")

    def _forward(self, head: RequestHead, raw: bytes, backend: Backend, upstream: socket.socket,
                 fresh: bool, new_cookie: str | None, started: float) -> bool:
        port = self.port
        body = BodyTracker(head.framing, head.length)
        reusable = False
        try:
            try:
                first = self._body_start(body)
                resp = self._send_and_read(head, raw + first, body, upstream, fresh, backend)
                if resp is None:  # a stale pooled connection: once more on a fresh one
                    upstream.close()
                    upstream = self.pool.dial(backend, self.limits.connect_timeout)
                    resp = self._send_and_read(head, raw + first, body, upstream, True, backend)
                    if resp is None:
                        raise _Failed(502, f"endpoint of service {port.name} closed the "
                                           "connection without answering")
            except UnavailableError:
                raise _Failed(502, f"cannot reach any endpoint of service {port.name}") from None
            except HeadError as e:
                MALFORMED.labels("endpoint").inc()
                raise _Failed(502, f"bad response from an endpoint of service {port.name}: "
                                   f"{e}") from None
            rhead, rraw, rest = resp
            if rhead.status == 101 and head.upgrade:
                port.count(101, started)
                self._send_client(rraw + rest)
                self.deadline = 0.0  # an upgraded connection has its own idle timeout
                self._splice(upstream)
                return False
            reusable = self._relay_response(head, rhead, rraw, rest, upstream, new_cookie)
            port.count(rhead.status, started)
            return (head.keep_alive and rhead.framing is not Framing.CLOSE and body.done
                    and rhead.status != 101)
        except _Failed as e:
            port.count(e.status, started)
            self._answer(e.status, e.text)
            return False
        finally:
            self.upstream = None
            if reusable:
                self.pool.put(backend, upstream)
            else:
                upstream.close()

    def _body_start(self, body: BodyTracker) -> bytes:
        """The part of the request body already read with its head."""
        if body.done or not self.buf:
            return b""
        n = body.feed(self.buf)
        first, self.buf = self.buf[:n], self.buf[n:]
        return first

    def _send_and_read(self, head: RequestHead, out: bytes, body: BodyTracker,
                       upstream: socket.socket, fresh: bool, backend: Backend
                       ) -> tuple[ResponseHead, bytes, bytes] | None:
        """Send the request, move its body (after a 100 if asked), read the final response head.

        None when a pooled connection proves closed before anything was answered and the
        request can be sent again (no body bytes were consumed beyond ``out``).
        """
        retry_ok = not fresh and body.done
        self.upstream = upstream
        self.deadline = time.monotonic() + self.limits.body_timeout
        try:
            send_all(upstream, out)
        except OSError:
            if retry_ok:
                return None
            raise UnavailableError("endpoint closed while the request was sent") from None
        pump = None
        if not body.done:
            if not head.expect_continue:
                self._pump_body(body, upstream)
            else:  # the body moves when the client sends it: after our 100, or its own timer
                pump = tasks.spawn("http-body", self._pump_quietly, body, upstream)
        try:
            buf = b""
            while True:
                got = self._read_response_head(upstream, buf, head.method, retry_ok)
                if got is None:
                    return None
                rhead, rraw, buf = got
                if rhead.status >= 200 or rhead.status == 101:
                    return rhead, rraw, buf
                self._send_client(rraw)  # 100 Continue, 103 Early Hints, ...
                retry_ok = False
        finally:
            if pump is not None:
                pump.kill()  # a final answer came first: the client's body is not wanted

    def _pump_quietly(self, body: BodyTracker, upstream: socket.socket) -> None:
        try:
            self._pump_body(body, upstream)
        except (_ClientGone, UnavailableError) as e:
            log.debug("%s: request body stopped: %s", self.port.name, e)

    def _read_response_head(self, upstream: socket.socket, buf: bytes, method: bytes,
                            retry_ok: bool) -> tuple[ResponseHead, bytes, bytes] | None:
        limits = self.limits
        self.deadline = time.monotonic() + limits.response_timeout
        self.awaiting_head = True
        try:
            while True:
                end = head_end(buf, limits.head, request=False) if buf else -1
                if end >= 0:
                    return (parse_response_head(buf[:end], method, limits.head), buf[:end],
                            buf[end:])
                try:
                    data = upstream.recv(RECV_SIZE)
                except OSError:
                    data = b""
                if not data:
                    self._response_head_missing(buf, retry_ok)
                    return None
                buf += data
        finally:
            self.awaiting_head = False

    def _response_head_missing(self, buf: bytes, retry_ok: bool) -> None:
        """The endpoint closed (or the watchdog did, at the deadline) before a complete
        response head; returns only when the request may be retried on a fresh connection."""
        if self.expired:
            self.expired = False
            raise _Failed(504, f"endpoint of service {self.port.name} did not answer in "
                               f"{self.limits.response_timeout:g}s")
        if not (retry_ok and not buf):
            raise HeadError("endpoint closed the connection before a complete response head",
                            502)

    def _pump_body(self, body: BodyTracker, upstream: socket.socket) -> None:
        """Forward the rest of the request body from the client."""
        while not body.done:
            data = self._recv_client(self.limits.body_timeout)
            if not data:
                raise _ClientGone("closed inside a request body")
            n = body.feed(data)
            if n < len(data):
                self.buf = data[n:]  # pipelined next request
            try:
                upstream.sendall(data[:n] if n < len(data) else data)
            except OSError as e:
                raise UnavailableError(f"endpoint stopped reading the body: {e}") from None

    def _relay_response(self, head: RequestHead, rhead: ResponseHead, rraw: bytes, rest: bytes,
                        upstream: socket.socket, new_cookie: str | None) -> bool:
        """Send the response to the client as it comes; True if ``upstream`` can be pooled."""
        if new_cookie is not None and self.port.cookie is not None:
            line_end = rraw.index(b"\n") + 1
            rraw = rraw[:line_end] + set_cookie_line(self.port.cookie, new_cookie) + \
                rraw[line_end:]
        if rhead.framing is Framing.LENGTH and len(rest) == rhead.length:  # the common case
            self._send_client(rraw + rest)
            return rhead.keep_alive and head.keep_alive and not head.upgrade
        body = BodyTracker(rhead.framing, rhead.length)
        n = body.feed(rest) if rest else 0
        self._send_client(rraw + rest[:n] if n < len(rest) else rraw + rest)
        clean = n == len(rest)  # an endpoint sending past its response cannot be reused
        while not body.done:
            self.deadline = time.monotonic() + self.limits.body_timeout
            try:
                data = upstream.recv(RECV_SIZE)
            except OSError:
                raise _ClientGone("endpoint failed inside a response body") from None
            if not data:
                try:
                    body.eof()
                except HeadError:
                    raise _ClientGone("endpoint closed inside a response body") from None
                return False
            n = body.feed(data)
            clean = clean and n == len(data)
            self._send_client(data if n == len(data) else data[:n])
        return clean and rhead.keep_alive and head.keep_alive and not head.upgrade

    def _splice(self, upstream: socket.socket) -> None:
        """After 101: bytes both ways until either side closes (half-closes propagated)."""
        if self.buf:
            upstream.sendall(self.buf)
            self.buf = b""
        timeout = self.limits.tunnel_idle_timeout
        back = tasks.spawn("http-upgraded", _pump, upstream, self.client, timeout)
        try:
            _pump(self.client, upstream, timeout)
            back.join(timeout)
        finally:
            back.kill()


def _pump(src: socket.socket, dst: socket.socket, timeout: float) -> None:
    src.settimeout(timeout)
    try:
        while True:
            data = src.recv(RECV_SIZE)
            if not data:
                break
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
