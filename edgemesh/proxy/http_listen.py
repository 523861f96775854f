"""Listeners for the ports the proxy does not simply splice: http ports balanced per request,
and https ports whose TLS server name (SNI) is read for logs and metrics.

The proxy module asks ``kind_for`` which listener a service port needs and ``make`` builds it;
both listeners look like ``tcp.TCPListener`` to the module (``address``, ``balancer``,
``backends``, ``update``, ``close``, ``kind``).

- ``HTTPListener``: a gevent ``StreamServer`` (bounded by ``maxConnections``) that hands each
  client connection to ``http.serve_connection``; one ``UpstreamPool`` per port.
- ``TLSListener``: the TCP splice path, but each accepted connection first waits (at most
  ``SNI_WAIT`` seconds, on libev watchers, no greenlet) for the ClientHello, peeked with
  ``MSG_PEEK`` so the bytes stay in the socket for the splice. TLS is never terminated;
  balancing stays per connection (``consistentHash.useSourceIp`` applies as on any TCP port).
  gRPC and HTTP/2 ports are plain TCP ports: balanced per connection, not per stream.
"""
from __future__ import annotations

import _socket
import logging
from collections.abc import Callable
from typing import Any

from gevent.pool import Pool
from gevent.server import StreamServer

from edgemesh.meta.istio import HttpCookie
from edgemesh.meta.models import AppProtocol, Service, ServicePort
from edgemesh.meta.store import Backend, Store
from edgemesh.proxy.dialer import Dialer
from edgemesh.proxy.http import (
    HttpLimits,
    HttpPort,
    UpstreamPool,
    serve_connection,
    wants_per_request,
)
from edgemesh.proxy.lb import Balancer, LBSpec
from edgemesh.proxy.tcp import CONNECTIONS, READ, REJECTED, Conn, TCPListener, TCPProxy
from edgemesh.proxy.tls_sni import MAX_HELLO, SniStatus, client_hello_sni
from edgemesh.runtime import metrics
from edgemesh.runtime.logs import Once

log = logging.getLogger(__name__)
_once = Once()

SNI_WAIT = 2.0  # seconds an https connection may take to send its ClientHello
SNI_RETRY = 0.01  # a partial ClientHello is peeked again after this long
MAX_SNI_LABELS = 256  # distinct server names reported as metric labels; the rest are "other"

TLS_CONNECTIONS = metrics.counter("edgemesh_proxy_tls_connections_total",
                                  "Connections to https ports by the TLS server name (SNI) "
                                  "the client asked for (\"\": none, \"other\": past the label "
                                  "limit, \"not-tls\": no ClientHello).", ["service", "sni"])
_sni_labels: set[str] = set()


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
         balancer: Balancer, backends: list[Backend]) -> Any:
    """The listener of ``kind`` for a service port of the proxy ``module``."""
    cfg = module.config
    if kind == "http":
        store = module.ctx.store
        return HTTPListener(name, module.listen_ip, balancer, backends, module.dialer,
                            lambda: cookie_for(store, service, port),
                            HttpLimits(connect_timeout=cfg.connectTimeout,
                                       head_timeout=cfg.httpHeaderTimeout,
                                       idle_timeout=cfg.httpIdleTimeout,
                                       response_timeout=cfg.httpResponseTimeout),
                            cfg.maxConnections)
    return TLSListener(module.tcp, name, module.listen_ip, balancer, backends)


class HTTPListener:
    """A service port balanced per request (see ``edgemesh.proxy.http``)."""
    kind = "http"

    def __init__(self, name: str, ip: str, balancer: Balancer, backends: list[Backend],
                 dialer: Dialer, cookie_of: Callable[[], HttpCookie | None],
                 limits: HttpLimits, max_connections: int) -> None:
        self.name = name
        self.balancer = balancer
        self.backends = backends
        self.limits = limits
        self._cookie_of = cookie_of
        self.port = HttpPort(name, balancer, lambda: self.backends, cookie_of())
        self.pool = UpstreamPool(dialer)
        self._accepted = CONNECTIONS.labels(name)
        self.server = StreamServer((ip, 0), self._handle, spawn=Pool(max_connections))
        self.server.start()
        self.address: tuple[str, int] = self.server.address[:2]

    def _handle(self, sock: Any, addr: tuple[str, int]) -> None:
        self._accepted.inc()
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        serve_connection(sock, addr, self.port, self.pool, self.limits)

    def update(self, balancer: Balancer, backends: list[Backend]) -> None:
        self.balancer = self.port.balancer = balancer
        self.backends = backends
        self.port.cookie = self._cookie_of()
        self.pool.retain(set(backends))

    def close(self) -> None:
        """Stop accepting; requests in flight finish."""
        self.server.close()
        self.pool.close()


class TLSListener(TCPListener):
    """An https port: spliced per connection after its ClientHello's SNI was peeked."""
    kind = "https"

    def __init__(self, proxy: TCPProxy, name: str, ip: str, balancer: Balancer,
                 backends: list[Backend]) -> None:
        super().__init__(proxy, name, ip, balancer, backends)

    def _accept_batch(self) -> None:
        proxy = self.proxy
        for _ in range(64):
            try:
                fd, addr = self.sock._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as e:
                if _once(("accept", e.errno)):
                    log.error("accept on %s: %s", self.name, e)
                return
            client = _socket.socket(self.family, _socket.SOCK_STREAM, 0, fd)
            if len(proxy.conns) >= proxy.max_connections:
                REJECTED.labels(self.name, "limit").inc()
                client.close()
                continue
            client.setblocking(False)
            client.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            self._accepted.value += 1
            conn = Conn(proxy, self, client, addr[0])
            proxy.conns.add(conn)
            _HelloWait(self, conn)


class _HelloWait:
    """Waits for one connection's ClientHello, reports its SNI, then lets the splice start."""
    __slots__ = ("listener", "conn", "io", "timer", "retry")

    def __init__(self, listener: TLSListener, conn: Conn) -> None:
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
