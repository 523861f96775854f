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
- ``serve_connection`` runs one client connection. The common case — a request without a
  body answered with a content-length (or no) body on a pooled upstream connection — runs on
  libev watcher callbacks (``httpflow.Fast``): no greenlet switch per request. Everything else
  (request bodies, chunked or close-delimited or large responses, ``Expect: 100-continue``,
  upgrades, dialling, errors) is handed to the greenlet exchange below, which then hands the
  connection back.
- heads are parsed by ``http_head`` (bounded, within ``head_timeout`` of their first byte; an
  idle keep-alive connection closes after ``idle_timeout``); bodies pass through as sent, framed
  by ``http_body``; ``Upgrade`` (WebSocket) requests are spliced both ways after ``101``.
- failures: ``Failure`` says what went wrong, the router says what the client sees.

Upstream connections are pooled per endpoint (``http_pool``); a pooled connection that turns
out closed is retried once on a fresh one for requests without a body, and checked before reuse
when the request has one. Deadlines are enforced by one watchdog (``_Watchdog``) instead of
per-call socket timeouts, which arm a timer on every blocking read.

Cost, measured (``bench/http.py``, ``bench/gateway.py``; haproxy ``mode http``, one thread, as
the peer): a greenlet per request cost ~40 µs of CPU per small keep-alive request against
haproxy's ~15 µs; on callbacks, with heads parsed once per distinct head (``httpflow._Memo``),
~20 µs, the same four syscalls per request as haproxy.
"""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import gevent

from edgemesh.errors import UnavailableError
from edgemesh.meta.store import Backend
from edgemesh.proxy.http_body import BodyTracker
from edgemesh.proxy.http_head import (
    Framing,
    HeadError,
    RequestHead,
    ResponseHead,
    head_end,
    parse_request_head,
    parse_response_framing,
)
from edgemesh.proxy.http_pool import UpstreamPool
from edgemesh.proxy.http_router import Failure, Forward, HttpLimits, Reply, Router
from edgemesh.runtime import metrics, tasks
from edgemesh.runtime.logs import Once

log = logging.getLogger(__name__)
_once = Once()

MALFORMED = metrics.counter("edgemesh_http_malformed_total",
                            "Malformed HTTP messages rejected, by who sent them.", ["sender"])

RECV_SIZE = 65536


class _ClientGone(Exception):
    """The client closed, reset or stalled; nothing more can be said to it."""


class _Failed(Exception):
    """The exchange failed before any response byte reached the client."""

    def __init__(self, failure: Failure, status: int, detail: str) -> None:
        super().__init__(detail)
        self.failure, self.status, self.detail = failure, status, detail


class _Watchdog:
    """Enforces every connection's current deadline from one greenlet.

    Each connection sets ``deadline`` (monotonic seconds, 0: none) as it moves between phases;
    this sweep calls ``expire()`` on those past theirs. Precision is a quarter of the shortest
    timeout in use (at most a second).
    """

    def __init__(self) -> None:
        self.conns: set[Connection] = set()
        self.tick = 1.0
        self._greenlet: object = None

    def add(self, conn: Connection) -> None:
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


WATCHDOG = _Watchdog()


def serve_connection(client: socket.socket, client_addr: tuple[str, int], router: Router,
                     pool: UpstreamPool, limits: HttpLimits = HttpLimits(),
                     fast: bool = True) -> None:
    """Serve one client connection request by request until either side ends it; closes it.

    ``fast``: the client is a plain (not TLS) gevent socket the callback path may drive.
    """
    conn = Connection(client, client_addr[0], router, pool, limits)
    WATCHDOG.add(conn)
    try:
        conn.run(fast)
    finally:
        WATCHDOG.conns.discard(conn)
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


def _shutdown(sock: Any, how: int = socket.SHUT_RDWR) -> None:
    if sock is not None:
        try:
            sock.shutdown(how)
        except OSError:
            pass


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


class Connection:
    """One client connection: its buffer, deadline and the greenlet exchange."""
    __slots__ = ("client", "client_ip", "router", "pool", "limits", "buf", "deadline",
                 "upstream", "awaiting_head", "reading_head", "expired", "fast", "plain")

    def __init__(self, client: socket.socket, client_ip: str, router: Router,
                 pool: UpstreamPool, limits: HttpLimits) -> None:
        self.client = client
        self.client_ip = client_ip
        self.router = router
        self.pool = pool
        self.limits = limits
        self.buf = b""  # bytes from the client not yet forwarded
        self.deadline = 0.0  # when the current phase times out (see _Watchdog)
        self.upstream: socket.socket | None = None  # the endpoint of the request in flight
        self.awaiting_head = False  # waiting for the endpoint's response head
        self.reading_head = False  # waiting for the rest of a request head
        self.expired = False
        self.fast: Any = None  # the callback path while it drives the connection
        self.plain = False  # the client socket is a plain one (not TLS)

    def expire(self) -> None:
        """The current phase ran out of time: unblock whoever waits."""
        self.deadline = 0.0
        if self.fast is not None:
            self.fast.expire()
            return
        self.expired = True
        _shutdown(self.upstream)
        if self.reading_head:  # the client may still get its 408
            _shutdown(self.client, socket.SHUT_RD)
        elif not self.awaiting_head:  # else the client still gets its 504
            _shutdown(self.client)

    def run(self, fast: bool) -> None:
        from edgemesh.proxy.httpflow import CLOSED, Fast
        self.plain = fast
        flow = Fast(self) if fast else None
        try:
            while True:
                step = flow.run() if flow is not None else None
                if step is CLOSED:
                    return
                keep = self._resume(step) if isinstance(step, Resume) else self._one_request()
                if not keep:
                    return
        except _ClientGone:
            pass
        finally:
            if flow is not None:
                flow.close()

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
        self.reading_head = True
        try:
            while True:
                end = head_end(buf, limits.head)
                if end >= 0:
                    self.buf = buf[end:]
                    return buf[:end]
                try:
                    data = self.client.recv(RECV_SIZE)  # under the head's deadline
                except OSError as e:
                    raise _ClientGone(str(e)) from None
                if not data:
                    if self.expired:
                        self.buf = buf
                        raise _Failed(Failure.HEAD_TIMEOUT, 408, "request head timeout")
                    raise _ClientGone("closed inside a request head")
                buf += data
        finally:
            self.reading_head = False

    def _send_client(self, data: bytes | memoryview) -> None:
        self.deadline = time.monotonic() + self.limits.body_timeout
        try:
            if self.plain:
                send_all(self.client, data)
            else:  # TLS: the bytes must go through the TLS layer
                self.client.sendall(data)
        except OSError as e:
            raise _ClientGone(str(e)) from None

    def answer(self, failure: Failure, status: int, detail: str, started: float,
               keep: bool = False) -> bool:
        """Tell the client about a failure as the router words it; True if it may go on."""
        reply = self.router.failed(failure, status, detail, keep)
        if reply is None:
            return False
        self.router.count(reply.status, started)
        try:
            self.client.sendall(reply.data)
        except OSError:
            return False
        return reply.keep

    # ---- one request ---------------------------------------------------------------------------

    def _one_request(self) -> bool:
        """Read, decide and proxy one request; True if the connection may go on."""
        started = time.monotonic()
        try:
            raw = self._read_request_head()
            if raw is None:
                return False
            head = parse_request_head(raw, self.limits.head)
        except HeadError as e:
            MALFORMED.labels("client").inc()
            if _once(("client", str(e))):
                log.info("bad request from %s: %s", self.client_ip, e)
            return self.answer(Failure.BAD_REQUEST, e.status, str(e), started)
        except _Failed as e:
            return self.answer(e.failure, e.status, e.detail, started)
        max_body = self.limits.max_body
        if max_body and head.framing is Framing.LENGTH and head.length > max_body:
            return self.answer(Failure.BAD_REQUEST, 413, "request body too large", started)
        decision = self.router.decide(head, raw, self.client_ip)
        if isinstance(decision, Reply):
            self.router.count(decision.status, started)
            self._send_client(decision.data)
            return decision.keep and head.framing is Framing.NONE and head.keep_alive
        return self._exchange(Resume(head, raw, decision, started, set()))

    def _resume(self, step: Resume) -> bool:
        if step.response is None:
            return self._exchange(step)
        assert step.backend is not None and step.upstream is not None
        body = BodyTracker(Framing.NONE)
        try:
            return self._finish(step, body, step.backend, step.upstream, *step.response)
        finally:
            step.fwd.balancer.release(step.backend)

    def _exchange(self, step: Resume) -> bool:
        """Proxy one request and its response; True if the client connection may go on."""
        head, fwd = step.head, step.fwd
        body = BodyTracker(head.framing, head.length)
        out = fwd.wire + self._body_start(body)
        replayable = body.done and not head.upgrade
        while True:
            try:
                backend, upstream, fresh = self._connect(fwd, step.exclude, not replayable,
                                                         step.picked)
                step.picked = None
            except _Failed as e:
                return self.answer(e.failure, e.status, e.detail, step.started,
                                   keep=replayable and head.keep_alive)
            try:
                upstream, resp = self._attempt(head, out, body, upstream, fresh, backend, fwd)
                status = resp[0].status
                if (replayable and fwd.retry_on is not None and fwd.retry_on(status)
                        and len(step.exclude) + 1 < min(
                            fwd.attempts or self.limits.connect_attempts, len(fwd.backends))):
                    upstream.close()
                    step.exclude.add(backend)
                    continue
                return self._finish(step, body, backend, upstream, *resp)
            except _Failed as e:
                upstream.close()
                return self.answer(e.failure, e.status, e.detail, step.started,
                                   keep=replayable and head.keep_alive)
            finally:
                fwd.balancer.release(backend)

    def _connect(self, fwd: Forward, exclude: set[Backend], check: bool,
                 picked: Backend | None) -> tuple[Backend, socket.socket, bool]:
        if not fwd.backends:
            raise _Failed(Failure.NO_ENDPOINT, 503, "no endpoints available")
        errors = []
        attempts = fwd.attempts or self.limits.connect_attempts
        while len(exclude) < attempts:
            backend = picked or fwd.balancer.pick(fwd.backends, fwd.key, exclude)
            picked = None
            if backend is None:
                break
            sock = self.pool.take(backend, check)
            if sock is not None:
                return backend, sock, False
            try:
                return backend, self.pool.dial(backend, self.limits.connect_timeout), True
            except UnavailableError as e:
                fwd.balancer.release(backend)
                exclude.add(backend)
                errors.append(str(e))
        if errors and _once(("unreachable", tuple(fwd.backends))):
            log.warning("endpoints unreachable: %s", "; ".join(errors))
        raise _Failed(Failure.UNREACHABLE, 502, "cannot reach any endpoint")

    def _attempt(self, head: RequestHead, out: bytes, body: BodyTracker,
                 upstream: socket.socket, fresh: bool, backend: Backend, fwd: Forward
                 ) -> tuple[socket.socket, tuple[ResponseHead, bytes, bytes]]:
        """Send the request (once more on a fresh connection if a pooled one proves closed);
        the connection used, and the final response head, its bytes and what followed it."""
        try:
            try:
                resp = self._send_and_read(head, out, body, upstream, fresh, fwd)
                if resp is None:  # a stale pooled connection: once more on a fresh one
                    upstream.close()
                    upstream = self.pool.dial(backend, self.limits.connect_timeout)
                    resp = self._send_and_read(head, out, body, upstream, True, fwd)
                    if resp is None:
                        raise _Failed(Failure.NO_ANSWER, 502,
                                      "endpoint closed the connection without answering")
            finally:
                self.upstream = None
        except UnavailableError:
            raise _Failed(Failure.UNREACHABLE, 502, "cannot reach any endpoint") from None
        except HeadError as e:
            MALFORMED.labels("endpoint").inc()
            raise _Failed(Failure.BAD_RESPONSE, 502, f"bad response from an endpoint: {e}"
                          ) from None
        return upstream, resp

    def _body_start(self, body: BodyTracker) -> bytes:
        """The part of the request body already read with its head."""
        if body.done or not self.buf:
            return b""
        n = body.feed(self.buf)
        first, self.buf = self.buf[:n], self.buf[n:]
        return first

    def _send_and_read(self, head: RequestHead, out: bytes, body: BodyTracker,
                       upstream: socket.socket, fresh: bool, fwd: Forward
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
            return self._final_head(head, upstream, b"", fwd, retry_ok)
        finally:
            if pump is not None:
                pump.kill()  # a final answer came first: the client's body is not wanted

    def _final_head(self, head: RequestHead, upstream: socket.socket, buf: bytes,
                    fwd: Forward, retry_ok: bool) -> tuple[ResponseHead, bytes, bytes] | None:
        """Read response heads, relaying 1xx ones, up to the final one (or 101)."""
        while True:
            got = self._read_response_head(upstream, buf, head.method, fwd, retry_ok)
            if got is None:
                return None
            rhead, rraw, buf = got
            if rhead.status >= 200 or rhead.status == 101:
                return rhead, rraw, buf
            self._send_client(rraw)  # 100 Continue, 103 Early Hints, ...
            retry_ok = False

    def _pump_quietly(self, body: BodyTracker, upstream: socket.socket) -> None:
        try:
            self._pump_body(body, upstream)
        except (_ClientGone, UnavailableError, HeadError) as e:
            log.debug("request body stopped: %s", e)

    def _read_response_head(self, upstream: socket.socket, buf: bytes, method: bytes,
                            fwd: Forward, retry_ok: bool
                            ) -> tuple[ResponseHead, bytes, bytes] | None:
        limits = self.limits
        self.deadline = time.monotonic() + fwd.wait(limits.response_timeout)
        self.awaiting_head = True
        try:
            while True:
                end = head_end(buf, limits.head, request=False) if buf else -1
                if end >= 0:
                    return (parse_response_framing(buf[:end], method, limits.head), buf[:end],
                            buf[end:])
                try:
                    data = upstream.recv(RECV_SIZE)
                except OSError:
                    data = b""
                if not data:
                    self._response_head_missing(buf, retry_ok, fwd)
                    return None
                buf += data
        finally:
            self.awaiting_head = False

    def _response_head_missing(self, buf: bytes, retry_ok: bool, fwd: Forward) -> None:
        """The endpoint closed (or the watchdog did, at the deadline) before a complete
        response head; returns only when the request may be retried on a fresh connection."""
        if self.expired:
            self.expired = False
            wait = fwd.response_timeout or self.limits.response_timeout
            raise _Failed(Failure.TIMEOUT, 504, f"endpoint did not answer in {wait:g}s")
        if not (retry_ok and not buf):
            raise HeadError("endpoint closed the connection before a complete response head",
                            502)

    def _pump_body(self, body: BodyTracker, upstream: socket.socket) -> None:
        """Forward the rest of the request body from the client."""
        max_body, sent = self.limits.max_body, 0
        while not body.done:
            data = self._recv_client(self.limits.body_timeout)
            if not data:
                raise _ClientGone("closed inside a request body")
            n = body.feed(data)
            sent += n
            if max_body and sent > max_body:
                raise _ClientGone("request body too large")
            if n < len(data):
                self.buf = data[n:]  # pipelined next request
            try:
                upstream.sendall(data[:n] if n < len(data) else data)
            except OSError as e:
                raise UnavailableError(f"endpoint stopped reading the body: {e}") from None

    def _finish(self, step: Resume, body: BodyTracker, backend: Backend,
                upstream: socket.socket, rhead: ResponseHead, rraw: bytes, rest: bytes) -> bool:
        """Relay the response whose head was read; True if the client connection may go on."""
        head, fwd = step.head, step.fwd
        reusable = False
        try:
            if rhead.status < 200 and rhead.status != 101:  # from the callback path
                self._send_client(rraw)
                got = self._final_head(head, upstream, rest, fwd, False)
                assert got is not None
                rhead, rraw, rest = got
            if rhead.status == 101 and head.upgrade:
                self.router.count(101, step.started)
                self._send_client(rraw + rest)
                self.deadline = 0.0  # an upgraded connection has its own idle timeout
                self._splice(upstream)
                return False
            if fwd.edit_response is not None:
                rraw = fwd.edit_response(rraw)
            reusable = self._relay_response(head, rhead, rraw, rest, upstream)
            self.router.count(rhead.status, step.started)
            return (head.keep_alive and rhead.framing is not Framing.CLOSE and body.done
                    and rhead.status != 101)
        except (_Failed, HeadError) as e:
            status, failure = (e.status, e.failure) if isinstance(e, _Failed) else \
                (502, Failure.BAD_RESPONSE)
            return self.answer(failure, status, str(e), step.started)
        finally:
            if reusable:
                self.pool.put(backend, upstream)
            else:
                upstream.close()

    def _relay_response(self, head: RequestHead, rhead: ResponseHead, rraw: bytes, rest: bytes,
                        upstream: socket.socket) -> bool:
        """Send the response to the client as it comes; True if ``upstream`` can be pooled."""
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
            _shutdown(s)
