"""Listeners for the ports the proxy does not simply splice: http ports balanced per request,
and https ports whose TLS server name (SNI) is read for logs and metrics.

The proxy module asks ``kind_for`` which handler a service port needs and ``make`` builds it;
both look like ``tcp.TCPPort`` to the module (``accept``, ``balancer``, ``backends``,
``update``, ``close``, ``kind``): connections come from the module's transparent listener
(``transparent.py``), or from a listening socket of the port's own (``--no-iptables``).

- ``HTTPListener``: a greenlet pool (bounded by ``maxConnections``) that hands each
  client connection to the HTTP engine (``http.serve_connection``) with the port's router,
  ``HttpPort``: each request's key (header, cookie, query parameter or source IP) picks an
  endpoint with the port's balancer; with cookie persistence (a DestinationRule
  ``consistentHash.httpCookie`` with a ``ttl``; ``0s``: a session cookie) a request without
  the cookie gets a generated value, and its response one ``Set-Cookie`` line (Istio/Envoy
  semantics: the value is hashed on the ring, so later requests carrying it stick to the same
  endpoint; without a ``ttl`` nothing is generated and such a request goes to any endpoint).
  Each request-target is normalised first as the gateway does (``http_target``: dot segments
  removed, unreserved escapes decoded, slashes merged; an absolute URI's authority becomes
  ``Host``, and one that disagrees with ``Host`` is refused): the endpoint gets the same
  origin-form path the gateway (or nginx, which normalises too) would send, so an endpoint's
  own path checks cannot be stepped around by ``/x/../admin`` through the mesh either.
  Errors answer with a short text naming the service and close the connection: 503 no
  endpoints, 502 unreachable or broken, 504 no response head in time, 400/431/501/405
  malformed requests (a refused target too: 400, counted with every other malformed
  message in ``edgemesh_http_malformed_total{sender="client", cause}``); a request head not complete
  within ``httpHeaderTimeout`` closes the connection without an answer.
  One ``UpstreamPool`` per port.
- ``TLSPort``/``TLSListener``: the TCP splice path, but each accepted connection first waits
  (at most ``SNI_WAIT`` seconds, on libev watchers, no greenlet) for the ClientHello, peeked with
  ``MSG_PEEK`` so the bytes stay in the socket for the splice. TLS is never terminated;
  balancing stays per connection (``consistentHash.useSourceIp`` applies as on any TCP port).
  gRPC and HTTP/2 ports are plain TCP ports: balanced per connection, not per stream.
"""
from __future__ import annotations

import _socket
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gevent.pool import Pool
from gevent.socket import socket as GeventSocket

from edgemesh.dialer import Dialer
from edgemesh.meta.istio import HttpCookie
from edgemesh.meta.models import AppProtocol, Service, ServicePort
from edgemesh.meta.store import Backend, Store
from edgemesh.proxy.http import serve_connection
from edgemesh.proxy.http_conn import MALFORMED, malformed
from edgemesh.proxy.http_head import RequestHead
from edgemesh.proxy.http_pool import UpstreamPool
from edgemesh.proxy.http_router import (
    Failure,
    Forward,
    HttpLimits,
    Reply,
    request_key,
    text_response,
)
from edgemesh.proxy.http_target import NormalTarget, TargetError, normalize_request
from edgemesh.proxy.lb import Balancer, HashKey, LBSpec
from edgemesh.proxy.tcp import CONNECTIONS, READ, REJECTED, Acceptor, Conn, TCPPort, TCPProxy
from edgemesh.proxy.tls_sni import MAX_HELLO, SniStatus, client_hello_sni
from edgemesh.runtime import metrics

log = logging.getLogger(__name__)

REQUESTS = metrics.counter("edgemesh_http_requests_total",
                           "HTTP requests proxied per request, by service port and status.",
                           ["service", "code"])
DURATION = metrics.histogram("edgemesh_http_request_duration_seconds",
                             "From a request head read to its response's last byte sent.",
                             ["service"])
_HTTP_KEYS = (HashKey.HTTP_HEADER, HashKey.HTTP_COOKIE, HashKey.HTTP_QUERY)
SNI_WAIT = 2.0  # seconds an https connection may take to send its ClientHello
SNI_RETRY = 0.01  # a partial ClientHello is peeked again after this long
MAX_SNI_LABELS = 256  # distinct server names reported as metric labels; the rest are "other"

TLS_CONNECTIONS = metrics.counter("edgemesh_proxy_tls_connections_total",
                                  "Connections to https ports by the TLS server name (SNI) "
                                  "the client asked for (\"\": none, \"other\": past the label "
                                  "limit, \"not-tls\": no ClientHello).", ["service", "sni"])
_sni_labels: set[str] = set()


def wants_per_request(app: AppProtocol, spec: LBSpec, per_request_http: bool) -> bool:
    """True when an http port must be balanced per request rather than spliced per connection."""
    return app is AppProtocol.HTTP and (per_request_http or spec.hash_key in _HTTP_KEYS)


def set_cookie_line(cookie: HttpCookie, value: str) -> bytes:
    """The ``Set-Cookie`` field line Envoy writes for a generated hash cookie."""
    parts = [f'{cookie.name}="{value}"']
    if cookie.ttl:
        parts.append(f"Max-Age={int(cookie.ttl)}")
    parts.append(f"Path={cookie.path or '/'}")
    parts.append("HttpOnly")
    return b"Set-Cookie: " + "; ".join(parts).encode("latin-1") + b"\r\n"


def upstream_head(head: RequestHead, raw: bytes, target: NormalTarget) -> bytes:
    """The head as it goes upstream: origin-form with the normalised path and, for an
    absolute-form request, ``Host`` set to the URI's authority (``raw`` itself when the
    client sent that already; an origin-form request keeps its Host as sent, which names the
    effective authority)."""
    if not target.absolute and target.origin == head.target:
        return raw
    fields = raw.split(b"\r\n")[1:-2]  # the head ends with an empty line
    if target.absolute and target.authority is not None:
        fields = [b"Host: " + target.authority.text(),
                  *(f for f in fields if f.partition(b":")[0].lower() != b"host")]
    line = head.method + b" " + target.origin + b" HTTP/" + head.version
    return b"\r\n".join([line, *fields]) + b"\r\n\r\n"


def _cookie_edit(line: bytes) -> Callable[[bytes], bytes]:
    def edit(rraw: bytes) -> bytes:
        end = rraw.index(b"\n") + 1
        return rraw[:end] + line + rraw[end:]
    return edit


@dataclass
class HttpPort:
    """One http service port's router for the HTTP engine (see the module docstring)."""
    name: str  # "namespace/service:port", for error texts, logs and metrics
    balancer: Balancer
    backends: Callable[[], Sequence[Backend]]  # the current endpoints (read per request)
    cookie: HttpCookie | None = None  # cookie persistence settings from the DestinationRule
    _codes: dict[int, metrics.Counter] = field(default_factory=dict, repr=False)
    _duration: metrics.Histogram | None = field(default=None, repr=False)

    def decide(self, head: RequestHead, raw: bytes, client_ip: str) -> Forward | Reply:
        try:
            target = normalize_request(head.target, head.host or head.header(b"host"))
        except TargetError as e:
            return self._refused(e, client_ip)
        raw = upstream_head(head, raw, target)
        balancer = self.balancer
        key = request_key(balancer.spec, head, client_ip)
        edit = None
        if key is None and self.cookie is not None and self.cookie.ttl is not None:
            key = secrets.token_hex(8)
            edit = _cookie_edit(set_cookie_line(self.cookie, key))
        return Forward(balancer, self.backends(), key, raw, edit_response=edit)

    def _refused(self, error: TargetError, client_ip: str) -> Reply:
        malformed("client", error, client_ip)
        body = f"bad request: {error}\n".encode("utf-8", "replace")
        return Reply(400, text_response(400, body), False)

    def failed(self, failure: Failure, status: int, detail: str, keep: bool) -> Reply | None:
        if failure is Failure.HEAD_TIMEOUT:  # slowloris, or a stalled client: closed, counted
            MALFORMED.labels("client", "head_timeout").inc()
            return None
        if failure is Failure.BAD_REQUEST:
            text = f"bad request: {detail}"
        elif failure is Failure.NO_ENDPOINT:
            text = f"no endpoints available for service {self.name}"
        else:
            text = f"{detail} (service {self.name})"
        return Reply(status, text_response(status, f"{text}\n".encode("utf-8", "replace")), False)

    def count(self, code: int, started: float) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = REQUESTS.labels(self.name, str(code))
        child.inc()
        if self._duration is None:
            self._duration = DURATION.labels(self.name)
        self._duration.observe(time.monotonic() - started)


def kind_for(port: ServicePort, spec: LBSpec, per_request_http: bool) -> str | None:
    """``"http"``, ``"https"``, or None for a port the TCP or UDP listeners carry as they are."""
    if port.protocol != "TCP":
        return None
    if wants_per_request(port.app, spec, per_request_http):
        return "http"
    return "https" if port.app is AppProtocol.HTTPS else None


def cookie_for(store: Store, service: Service, port: ServicePort) -> HttpCookie | None:
    """The DestinationRule's ``consistentHash.httpCookie`` for this port, if it has one."""
    dr = store.destination_rule_for(service)
    settings = dr.policy_for(port.port) if dr is not None else None
    ch = settings.consistent_hash if settings is not None else None
    return ch.http_cookie if ch is not None else None


def make(kind: str, module: Any, name: str, service: Service, port: ServicePort,
         balancer: Balancer, backends: Sequence[Backend], listen_ip: str | None) -> Any:
    """The handler of ``kind`` for a service port of the proxy ``module``: with a listening
    socket of its own on ``listen_ip``, or (None) fed by the module's transparent listener."""
    cfg = module.config
    if kind == "http":
        store = module.ctx.store
        return HTTPListener(name, listen_ip, balancer, backends, module.dialer,
                            lambda: cookie_for(store, service, port),
                            HttpLimits(connect_timeout=cfg.connectTimeout,
                                       head_timeout=cfg.httpHeaderTimeout,
                                       idle_timeout=cfg.httpIdleTimeout,
                                       response_timeout=cfg.httpResponseTimeout),
                            cfg.maxConnections, module.tcp)
    if listen_ip is None:
        return TLSPort(module.tcp, name, balancer, backends)
    return TLSListener(module.tcp, name, listen_ip, balancer, backends)


class HTTPListener:
    """A service port balanced per request (see ``edgemesh.proxy.http``): each accepted
    connection (from its own socket on ``ip``, or handed over by the transparent listener
    through ``accept``) is served by a greenlet of a pool bounded by ``max_connections``."""
    kind = "http"

    def __init__(self, name: str, ip: str | None, balancer: Balancer, backends: Sequence[Backend],
                 dialer: Dialer, cookie_of: Callable[[], HttpCookie | None],
                 limits: HttpLimits, max_connections: int, proxy: TCPProxy) -> None:
        self.name = name
        self.balancer = balancer
        self.backends = backends
        self.limits = limits
        self._cookie_of = cookie_of
        self.port = HttpPort(name, balancer, lambda: self.backends, cookie_of())
        self.pool = UpstreamPool(dialer)
        self._accepted = CONNECTIONS.labels(name)
        self._clients = Pool(max_connections)
        self.acceptor = Acceptor(proxy, ip, 0, self.accept, name) if ip is not None else None
        self.address = self.acceptor.address if self.acceptor is not None else None

    def accept(self, client: Any, addr: tuple[Any, ...]) -> None:
        """Serve an accepted, non-blocking client socket in a greenlet of its own."""
        if self._clients.full():
            REJECTED.labels(self.name, "limit").inc()
            client.close()
            return
        self._accepted.inc()
        sock = GeventSocket(client.family, client.type, 0, fileno=client.detach())
        self._clients.spawn(serve_connection, sock, addr, self.port, self.pool,
                            self.limits)

    def update(self, balancer: Balancer, backends: Sequence[Backend]) -> None:
        self.balancer = self.port.balancer = balancer
        self.backends = backends
        self.port.cookie = self._cookie_of()
        self.pool.retain(set(backends))

    def close(self) -> None:
        """Stop accepting; requests in flight finish."""
        if self.acceptor is not None:
            self.acceptor.close()
        self.pool.close()


class TLSPort(TCPPort):
    """An https port: spliced per connection after its ClientHello's SNI was peeked."""
    kind = "https"

    def _start(self, conn: Conn) -> None:
        self.proxy.conns.add(conn)
        _HelloWait(self, conn)


class TLSListener(TLSPort):
    """An https port with a listening socket of its own."""

    def __init__(self, proxy: TCPProxy, name: str, ip: str, balancer: Balancer,
                 backends: Sequence[Backend]) -> None:
        super().__init__(proxy, name, balancer, backends)
        self.acceptor = Acceptor(proxy, ip, 0, self.accept, name)
        self.address = self.acceptor.address

    def close(self) -> None:
        self.acceptor.close()


class _HelloWait:
    """Waits for one connection's ClientHello, reports its SNI, then lets the splice start."""
    __slots__ = ("listener", "conn", "io", "timer", "retry")

    def __init__(self, listener: TLSPort, conn: Conn) -> None:
        loop = listener.proxy.loop
        self.listener, self.conn = listener, conn
        self.io = loop.io(conn.client.fileno(), READ)
        self.io.start(self.on_readable)
        self.timer = loop.timer(SNI_WAIT)
        self.timer.start(self.on_timeout)
        self.retry: Any = None

    def on_readable(self) -> None:
        if self.io is None:
            return
        try:
            self.io.stop()
            self._peek()
        except Exception:
            log.exception("sni peek on %s failed", self.listener.name)
            self._done(None)

    def _peek(self) -> None:
        try:
            data = self.conn.client.recv(MAX_HELLO, _socket.MSG_PEEK)
        except BlockingIOError:
            self.io.start(self.on_readable)
            return
        except OSError:
            data = b""
        if not data:  # closed before saying anything
            self._stop()
            self.conn.close()
            return
        result = client_hello_sni(data)
        if result.status is SniStatus.NEED_MORE:
            if self.retry is None:
                self.retry = self.listener.proxy.loop.timer(SNI_RETRY)
            self.retry.start(self.on_readable)
            return
        self._done(result.name if result.status is SniStatus.FOUND else None)

    def on_timeout(self) -> None:
        self._done(None)

    def _stop(self) -> None:
        for w in (self.io, self.timer, self.retry):
            if w is not None:
                w.stop()
                w.close()
        self.io = self.timer = self.retry = None

    def _done(self, sni: str | None) -> None:
        if self.io is None:
            return
        self._stop()
        name = self.listener.name
        label = "not-tls" if sni is None else sni
        if label not in _sni_labels:
            if len(_sni_labels) < MAX_SNI_LABELS:
                _sni_labels.add(label)
            else:
                label = "other"
        TLS_CONNECTIONS.labels(name, label).inc()
        log.debug("%s: TLS connection from %s, sni=%r", name, self.conn.client_ip, sni)
        if not self.conn.closed:
            self.conn.connect_next()
