"""The gateway's HTTP/1.1 shell: read a request head, ask the route table, act, repeat.

Heads are parsed by the proxy's strict sans-IO parser (``proxy.http_head``) and bodies framed
by ``proxy.http_body``: bytes pass through untouched except the request line (rewritten
target), the fields the route changes (``Host``, header operations) and ``X-Forwarded-For``
/ ``X-Forwarded-Proto``. Errors a client sees:

- 400/431/501 malformed or oversized heads (the parser's hint), 408 a head not received in
  ``requestHeaderTimeout``, 413 a body over ``maxRequestBodyBytes``;
- 404 no route for the host and path;
- 503 no endpoint, or none could be connected to (after retries);
- 502 the endpoint broke the protocol or closed without answering;
- 504 no response head within the route's ``timeout`` (``perTryTimeout`` per attempt), or
  ``upstreamTimeout`` when the route sets none.

Retries (Istio's defaults: 2 attempts on connect failures and 503) move to another endpoint;
responses are retried only for requests without a body, since a body is streamed, not kept.
Upstream connections are kept alive and reused, at most ``POOL_PER_BACKEND`` idle per endpoint.
"""
from __future__ import annotations

import logging
import random
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent

from edgemesh.errors import UnavailableError
from edgemesh.gateway import tcp
from edgemesh.gateway.routes import (
    Forward,
    NotFound,
    PortSpec,
    Request,
    Route,
    SendDirect,
    SendRedirect,
    Target,
)
from edgemesh.meta.istio import HeaderOps
from edgemesh.meta.models import Service, ServicePort
from edgemesh.meta.store import Backend, Store
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
from edgemesh.proxy.lb import Balancer, HashKey
from edgemesh.runtime import metrics
from edgemesh.runtime.logs import Once

log = logging.getLogger(__name__)
_once = Once()

REQUESTS = metrics.counter("edgemesh_gateway_requests_total",
                           "HTTP requests answered by the gateway, by status class.",
                           ["port", "code"])
DURATION = metrics.histogram("edgemesh_gateway_request_duration_seconds",
                             "Time from a request head to the end of its response.", ["port"])
BAD_REQUESTS = metrics.counter("edgemesh_gateway_bad_requests_total",
                               "Requests refused as malformed or over a limit.", ["reason"])
CHUNK = 65536
POOL_PER_BACKEND = 32
POOL_IDLE = 30.0
REASONS = {200: "OK", 301: "Moved Permanently", 302: "Found", 303: "See Other",
           307: "Temporary Redirect", 308: "Permanent Redirect", 400: "Bad Request",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           413: "Content Too Large", 431: "Request Header Fields Too Large",
           501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
           504: "Gateway Timeout"}


@dataclass(frozen=True)
class HttpSettings:
    limits: HeadLimits = HeadLimits()
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    client_timeout: float = 60.0
    upstream_timeout: float = 60.0
    connect_timeout: float = 5.0
    max_body: int = 0  # 0: unlimited
    tunnel_idle_timeout: float = 3600.0


class Upgrade(Exception):
    """Internal: the endpoint switched protocols; splice from here."""


class Upstreams:
    """Endpoints for targets (store + balancers), dialled (dialer) and kept alive (pool)."""

    def __init__(self, store: Store, balancers: object, dial: Callable[[Backend, float],
                                                                       socket.socket]) -> None:
        self.store = store
        self.balancers = balancers
        self._dial = dial
        self._idle: dict[tuple[str, int], list[tuple[socket.socket, float]]] = {}

    def resolve(self, target: Target) -> tuple[Service, ServicePort] | None:
        svc = self.store.service(target.namespace, target.name)
        if svc is None:
            return None
        if target.port is None:
            port = svc.ports[0] if len(svc.ports) == 1 else None
        else:
            port = next((p for p in svc.ports if p.port == target.port), None)
        return (svc, port) if port is not None else None

    def take(self, backend: Backend) -> socket.socket | None:
        idle = self._idle.get((backend.ip, backend.port))
        now = time.monotonic()
        while idle:
            sock, since = idle.pop()
            if now - since < POOL_IDLE and _still_open(sock):
                return sock
            sock.close()
        return None

    def dial(self, backend: Backend, timeout: float) -> socket.socket:
        return self._dial(backend, timeout)

    def give_back(self, backend: Backend, sock: socket.socket) -> None:
        idle = self._idle.setdefault((backend.ip, backend.port), [])
        if len(idle) >= POOL_PER_BACKEND:
            sock.close()
            return
        idle.append((sock, time.monotonic()))

    def close(self) -> None:
        for idle in self._idle.values():
            for sock, _ in idle:
                sock.close()
        self._idle.clear()


def _still_open(sock: socket.socket) -> bool:
    """An idle keep-alive connection is usable if the server has not closed or written."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


class ClientConn:
    """One client connection: its socket and bytes read but not yet used."""

    def __init__(self, sock: socket.socket, peer: tuple[str, int], scheme: str) -> None:
        self.sock = sock
        self.peer_ip = peer[0]
        self.scheme = scheme
        self.buf = b""

    def read_head(self, s: HttpSettings, first: bool) -> bytes | None:
        """The next request head; None when the client closed (or idled out) between requests."""
        self.sock.settimeout(s.header_timeout if first else s.idle_timeout)
        if not self.buf:
            try:
                self.buf = self.sock.recv(CHUNK)
            except (TimeoutError, OSError):
                return None
            if not self.buf:
                return None
        self.sock.settimeout(s.client_timeout)
        with gevent.Timeout(s.header_timeout, HeadTimeout):
            while (end := head_end(self.buf, s.limits)) < 0:
                data = self.sock.recv(CHUNK)
                if not data:
                    return None
                self.buf += data
        head, self.buf = self.buf[:end], self.buf[end:]
        return head

    def recv(self) -> bytes:
        if self.buf:
            data, self.buf = self.buf, b""
            return data
        return self.sock.recv(CHUNK)


class HeadTimeout(Exception):
    """A request head did not arrive in time (answered with 408)."""


def serve(sock: socket.socket, peer: tuple[str, int], spec_of: Callable[[], PortSpec | None],
          server: int, scheme: str, upstreams: Upstreams, s: HttpSettings) -> None:
    """Serve HTTP requests on one client connection until it ends."""
    conn = ClientConn(sock, peer, scheme)
    first = True
    while True:
        try:
            raw = conn.read_head(s, first)
            if raw is None:
                return
            head = parse_request_head(raw, s.limits)
        except HeadTimeout:
            _refuse(conn, 408, "request head timeout")
            return
        except HeadError as e:
            _refuse(conn, e.hint or 400, str(e))
            return
        except OSError:
            return
        first = False
        spec = spec_of()
        if spec is None:
            _respond(conn, 404, b"no gateway server on this port\n", keep=False)
            return
        started = time.monotonic()
        keep = _handle(conn, head, spec, server, upstreams, s)
        DURATION.labels(str(spec.port)).observe(time.monotonic() - started)
        if not keep or not head.keep_alive:
            return


def _refuse(conn: ClientConn, status: int, why: str) -> None:
    BAD_REQUESTS.labels(str(status)).inc()
    if _once(("bad", why)):
        log.info("gateway refused a request from %s: %s", conn.peer_ip, why)
    _respond(conn, status, f"{why}\n".encode(), keep=False)


def _facts(head: RequestHead, conn: ClientConn, port: int) -> Request:
    headers: dict[str, str] = {}
    for name, value in head.headers:
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return Request(method=head.method.decode("latin-1"), target=head.target.decode("latin-1"),
                   host=head.host.decode("latin-1"), headers=headers, scheme=conn.scheme,
                   port=port)


def _handle(conn: ClientConn, head: RequestHead, spec: PortSpec, server: int,
            upstreams: Upstreams, s: HttpSettings) -> bool:
    """Act on one request; True if the connection may carry another."""
    if s.max_body and head.framing is Framing.LENGTH and head.length > s.max_body:
        _refuse(conn, 413, "request body too large")
        return False
    req = _facts(head, conn, spec.port)
    action = spec.decide(req, random.random(), server)
    keep = head.framing is Framing.NONE  # unread bodies of answered requests end the connection
    if isinstance(action, NotFound):
        return _respond(conn, 404, b"no route\n", keep=keep, port=spec.port)
    if isinstance(action, SendRedirect):
        return _respond(conn, action.status, b"", keep=keep, port=spec.port,
                        extra=((b"Location", action.location.encode("latin-1")),))
    if isinstance(action, SendDirect):
        return _respond(conn, action.status, action.body, keep=keep, port=spec.port,
                        ctype=b"text/plain")
    assert isinstance(action, Forward)
    return _forward(conn, head, req, action, spec.port, upstreams, s)


def _respond(conn: ClientConn, status: int, body: bytes, *, keep: bool, port: int = 0,
             extra: tuple[tuple[bytes, bytes], ...] = (), ctype: bytes = b"text/plain") -> bool:
    lines = [b"HTTP/1.1 %d %s" % (status, REASONS.get(status, "Unknown").encode()),
             b"Content-Length: %d" % len(body), b"Content-Type: " + ctype,
             *(n + b": " + v for n, v in extra)]
    if not keep:
        lines.append(b"Connection: close")
    try:
        conn.sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    except OSError:
        return False
    REQUESTS.labels(str(port), f"{status // 100}xx").inc()
    return keep


def _apply_ops(headers: list[tuple[bytes, bytes]], ops: HeaderOps | None) -> None:
    if ops is None:
        return
    drop = {n.lower().encode() for n in ops.remove} | {n.lower().encode() for n, _ in ops.set}
    if drop:
        headers[:] = [(n, v) for n, v in headers if n.lower() not in drop]
    headers.extend((n.encode("latin-1"), v.encode("latin-1")) for n, v in ops.set)
    headers.extend((n.encode("latin-1"), v.encode("latin-1")) for n, v in ops.add)


def _request_head(head: RequestHead, action: Forward, conn: ClientConn) -> bytes:
    headers = [(n, v) for n, v in head.headers
               if n.lower() not in (b"host", b"x-forwarded-proto")]
    headers.insert(0, (b"Host", action.authority.encode("latin-1")))
    xff = head.header(b"x-forwarded-for")
    if xff is not None:
        headers = [(n, v) for n, v in headers if n.lower() != b"x-forwarded-for"]
    ip = conn.peer_ip.encode()
    headers.append((b"X-Forwarded-For", xff + b", " + ip if xff else ip))
    headers.append((b"X-Forwarded-Proto", conn.scheme.encode()))
    for ops in _ops(action, "request"):
        _apply_ops(headers, ops)
    lines = [head.method + b" " + action.path.encode("latin-1") + b" HTTP/" + head.version,
             *(n + b": " + v for n, v in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _ops(action: Forward, which: str) -> list[HeaderOps]:
    out = []
    for h in (action.route.headers, action.target.headers):
        if h is not None:
            out.append(getattr(h, which))
    return out


def _hash_key(balancer: Balancer, req: Request, conn: ClientConn) -> str | None:
    spec = balancer.spec
    if spec.hash_key is HashKey.HTTP_HEADER:
        return req.headers.get(spec.hash_name.lower())
    if spec.hash_key is HashKey.HTTP_QUERY:
        return req.query_params.get(spec.hash_name)
    if spec.hash_key is HashKey.HTTP_COOKIE:
        for part in req.headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == spec.hash_name:
                return value
        return None
    return conn.peer_ip if spec.wants_client_ip else None


def _retriable(route: Route, status: int) -> bool:
    on = route.retry_on
    return ("5xx" in on and status >= 500) or \
        ("gateway-error" in on and status in (502, 503, 504)) or \
        (status == 503 and ("503" in on or "retriable-status-codes" in on))


class _Attempt:
    """One request sent to one endpoint: its socket and what it answered."""

    def __init__(self, backend: Backend, sock: socket.socket, pooled: bool) -> None:
        self.backend = backend
        self.sock = sock
        self.pooled = pooled
        self.buf = b""
        self.head: ResponseHead | None = None


def _forward(conn: ClientConn, head: RequestHead, req: Request, action: Forward, port: int,
             upstreams: Upstreams, s: HttpSettings) -> bool:
    route = action.route
    resolved = upstreams.resolve(action.target)
    if resolved is None:
        return _respond(conn, 503, b"no such service port\n", keep=False, port=port)
    svc, sport = resolved
    backends = upstreams.store.backends(svc, sport)
    balancer: Balancer = upstreams.balancers.get(svc, sport)  # type: ignore[attr-defined]
    key = _hash_key(balancer, req, conn)
    wire = _request_head(head, action, conn)
    bodyless = head.framing is Framing.NONE and not head.upgrade
    deadline = time.monotonic() + route.timeout if route.timeout else None
    tries = 1 + max(route.attempts, 0)
    excluded: set[Backend] = set()
    status = 503
    while tries > 0:
        tries -= 1
        backend = balancer.pick(backends, key, excluded)
        if backend is None:
            break
        try:
            attempt = _send(conn, head, wire, backend, upstreams, s, bodyless)
        except UnavailableError:
            excluded.add(backend)
            balancer.release(backend)
            continue
        except (OSError, HeadError):
            balancer.release(backend)
            return False  # the client went away or broke its body mid-stream
        try:
            status = _await_response(conn, attempt, head, route, s, deadline)
        except Upgrade:
            balancer.release(backend)
            return _upgrade(conn, attempt, s, port)
        except _Failed as f:
            attempt.sock.close()
            balancer.release(backend)
            if attempt.pooled and f.status == 502:
                tries += 1  # a kept-alive connection the endpoint had closed: not a try
                continue
            excluded.add(backend)
            status = f.status
            if f.status == 504 or not bodyless:
                break
            continue
        if bodyless and _retriable(route, status) and len(excluded) + 1 < len(backends):
            attempt.sock.close()
            balancer.release(backend)
            excluded.add(backend)
            continue
        try:
            return _relay_response(conn, attempt, head, action, upstreams, s, port)
        finally:
            balancer.release(backend)
    text = {502: b"upstream broke the protocol\n", 504: b"upstream timed out\n"}.get(
        status, b"no healthy upstream\n")
    return _respond(conn, status if status in (502, 504) else 503, text, keep=bodyless,
                    port=port)


class _Failed(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _send(conn: ClientConn, head: RequestHead, wire: bytes, backend: Backend,
          upstreams: Upstreams, s: HttpSettings, bodyless: bool) -> _Attempt:
    """Connect (or reuse) and send the head and body; raises UnavailableError to move on."""
    if bodyless:
        sock = upstreams.take(backend)
        if sock is not None:
            try:
                sock.sendall(wire)
                return _Attempt(backend, sock, pooled=True)
            except OSError:
                sock.close()
    sock = upstreams.dial(backend, s.connect_timeout)
    try:
        sock.sendall(wire)
    except OSError as e:
        sock.close()
        raise UnavailableError(f"send to {backend.ip}:{backend.port}: {e}") from e
    attempt = _Attempt(backend, sock, pooled=False)
    if head.framing is not Framing.NONE:
        try:
            _send_body(conn, head, sock, s)
        except BaseException:
            sock.close()
            raise
    return attempt


def _send_body(conn: ClientConn, head: RequestHead, sock: socket.socket, s: HttpSettings
               ) -> None:
    tracker = BodyTracker(head.framing, head.length)
    sent = 0
    while not tracker.done:
        data = conn.recv()
        if not data:
            raise HeadError("client closed in the middle of its body")
        n = tracker.feed(data)
        sent += n
        if s.max_body and sent > s.max_body:
            raise HeadError("request body too large", 413)
        sock.sendall(data[:n])
        if n < len(data):
            conn.buf = data[n:] + conn.buf


def _await_response(conn: ClientConn, attempt: _Attempt, head: RequestHead, route: Route,
                    s: HttpSettings, deadline: float | None) -> int:
    """Read the response head (relaying 1xx); returns its status or raises _Failed/Upgrade."""
    wait = route.per_try_timeout or route.timeout or s.upstream_timeout
    if deadline is not None:
        wait = min(wait, max(deadline - time.monotonic(), 0.001))
    try:
        with gevent.Timeout(wait, _Failed(504)):
            while True:
                end = head_end(attempt.buf, s.limits, request=False)
                if end < 0:
                    data = attempt.sock.recv(CHUNK)
                    if not data:
                        raise _Failed(502)
                    attempt.buf += data
                    continue
                raw, attempt.buf = attempt.buf[:end], attempt.buf[end:]
                resp = parse_response_head(raw, head.method, s.limits)
                if resp.status == 101 and head.upgrade:
                    attempt.head = resp
                    conn.sock.sendall(raw)
                    raise Upgrade()
                if 100 <= resp.status < 200:
                    if resp.status == 100:
                        conn.sock.sendall(raw)
                    continue
                attempt.head = resp
                attempt.raw = raw  # type: ignore[attr-defined]
                return resp.status
    except HeadError as e:
        if _once(("upstream", str(e))):
            log.info("gateway: bad response from %s:%d: %s", attempt.backend.ip,
                     attempt.backend.port, e)
        raise _Failed(502) from None
    except OSError:
        raise _Failed(502) from None


def _relay_response(conn: ClientConn, attempt: _Attempt, head: RequestHead, action: Forward,
                    upstreams: Upstreams, s: HttpSettings, port: int) -> bool:
    resp = attempt.head
    assert resp is not None
    raw: bytes = attempt.raw  # type: ignore[attr-defined]
    ops = _ops(action, "response")
    if ops:
        headers = list(resp.headers)
        for o in ops:
            _apply_ops(headers, o)
        first = raw.split(b"\n", 1)[0].rstrip(b"\r")
        raw = b"\r\n".join([first, *(n + b": " + v for n, v in headers)]) + b"\r\n\r\n"
    tracker = BodyTracker(resp.framing, resp.length)
    n = tracker.feed(attempt.buf)
    reusable = resp.keep_alive
    try:
        conn.sock.sendall(raw + attempt.buf[:n])
        extra = attempt.buf[n:]
        attempt.sock.settimeout(s.upstream_timeout)
        while not tracker.done:
            data = attempt.sock.recv(CHUNK)
            if not data:
                tracker.eof()
                break
            n = tracker.feed(data)
            conn.sock.sendall(data[:n])
            extra = data[n:]
        reusable = reusable and not extra
    except (OSError, HeadError):
        attempt.sock.close()
        return False
    REQUESTS.labels(str(port), f"{resp.status // 100}xx").inc()
    if reusable:
        attempt.sock.settimeout(None)
        upstreams.give_back(attempt.backend, attempt.sock)
    else:
        attempt.sock.close()
    return resp.framing is not Framing.CLOSE


def _upgrade(conn: ClientConn, attempt: _Attempt, s: HttpSettings, port: int) -> bool:
    REQUESTS.labels(str(port), "1xx").inc()
    try:
        tcp.splice(conn.sock, attempt.sock, to_upstream=conn.buf, to_client=attempt.buf,
                   idle_timeout=s.tunnel_idle_timeout)
    finally:
        attempt.sock.close()
    return False
