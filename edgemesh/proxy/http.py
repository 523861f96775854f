"""One HTTP/1.1 exchange engine for the service proxy (per-request ports) and the gateway.

A *router* decides what each request gets; this module and ``httpflow`` do the I/O:

- the router (``http_router.Router``) sees each parsed request head and answers ``Forward``
  (endpoints, balancer and key, the head's bytes as they go upstream, a response-head edit,
  response timeout, attempts and which statuses are worth another endpoint) or ``Reply`` (a
  complete response: redirect, direct response, 404). It also writes the error pages
  (``failed``) and counts finished requests. ``http_listen.HttpPort`` (balancer, hash key from
  header, cookie, query or source IP, Set-Cookie) and ``gateway.http.GatewayRouter`` (route
  table: weighted destinations, rewrites, header operations, redirects, direct responses,
  timeouts, retries) are the two routers.
- ``serve_connection`` (here) runs one client connection. The common case — a request without
  a body answered with a content-length (or no) body on a pooled upstream connection — runs on
  libev watcher callbacks (``httpflow.Fast``): no greenlet switch per request. Everything else
  (request bodies, chunked or close-delimited or large responses, ``Expect: 100-continue``,
  upgrades, dialling, errors) is handed to the greenlet exchange (``http_greenlet``), which
  then hands the connection back. The two paths share the connection's state
  (``http_conn``) and every decision (``http_exchange``: retries, pooling, upgrades, failure
  replies), and never import each other.
- heads are parsed by ``http_head`` (bounded, within ``head_timeout`` of their first byte; an
  idle keep-alive connection closes after ``idle_timeout``); bodies pass through as sent, framed
  by ``http_body``; ``Upgrade: websocket`` requests are spliced both ways after ``101``; any
  other ``Upgrade`` offer is removed before routing, and a ``101`` to anything but a WebSocket
  handshake is answered 502.
- a pooled upstream connection is reused only when both messages on it were complete; after
  an early answer (before the request body was read whole) the client connection is closed
  after the response, lingering a bounded time (``http_exchange.LINGER_*``).
- a malformed request is the client's fault (400, or the parser's status, then close); a
  malformed response the endpoint's (502). Both are counted in
  ``edgemesh_http_malformed_total{sender, cause}`` and logged once per cause.
- failures: ``Failure`` says what went wrong, the router says what the client sees.

Upstream connections are pooled per endpoint (``http_pool``); a pooled connection that turns
out closed is retried once on a fresh one for requests without a body, and checked before reuse
when the request has one. Deadlines are enforced by one watchdog (``http_conn.Watchdog``) instead of
per-call socket timeouts, which arm a timer on every blocking read.

Measured costs against haproxy (``bench/http.py``, ``bench/gateway.py``): docs/performance.md.
"""
from __future__ import annotations

import socket
import time

from edgemesh.proxy.http_conn import (
    CLOSED,
    MALFORMED,
    RECV_SIZE,
    WATCHDOG,
    Resume,
    shutdown,
)
from edgemesh.proxy.http_exchange import LINGER_BYTES, LINGER_SECONDS
from edgemesh.proxy.http_greenlet import Connection
from edgemesh.proxy.http_pool import UpstreamPool
from edgemesh.proxy.http_router import HttpLimits, Router
from edgemesh.proxy.httpflow import Fast

__all__ = ["MALFORMED", "RECV_SIZE", "Resume", "serve_connection"]


def serve_connection(client: socket.socket, client_addr: tuple[str, int], router: Router,
                     pool: UpstreamPool, limits: HttpLimits = HttpLimits(),
                     fast: bool = True) -> None:
    """Serve one client connection request by request until either side ends it; closes it.

    ``fast``: the client is a plain (not TLS) gevent socket the callback path may drive.
    """
    conn = Connection(client, client_addr[0], router, pool, limits, plain=fast)
    WATCHDOG.add(conn)
    flow = Fast(conn) if fast else None
    try:
        while True:
            step = flow.run() if flow is not None else None
            if step is CLOSED or not conn.serve(step):  # type: ignore[arg-type]
                break
    finally:
        if flow is not None:
            flow.close()
        WATCHDOG.conns.discard(conn)
        if conn.linger:
            _linger(client)
        client.close()


def _linger(client: socket.socket) -> None:
    """Close after an early answer without resetting it away: half-close, then read and
    discard what the client still sends, within ``LINGER_BYTES`` and ``LINGER_SECONDS``
    (closing with unread bytes would send a reset that can destroy the response)."""
    shutdown(client, socket.SHUT_WR)
    end, left = time.monotonic() + LINGER_SECONDS, LINGER_BYTES
    try:
        while left > 0:
            wait = end - time.monotonic()
            if wait <= 0:
                break
            client.settimeout(wait)
            data = client.recv(min(RECV_SIZE, left))
            if not data:
                break
            left -= len(data)
    except OSError:
        pass
