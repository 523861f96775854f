"""The HTTP engine's fast path: the common exchange on libev watcher callbacks, no greenlet.

Measured (``bench/http.py``): a greenlet per connection that parses nothing already cost about
twice haproxy's CPU per request, most of it in the switches a blocking ``recv`` makes. Here
the hub's own io watchers call back on readability, so a small keep-alive request costs two
callbacks, four syscalls and the parsing — the way ``tcp.py`` splices TCP.

``Fast.run()`` drives one client connection (``http_conn.ConnState``) from its greenlet,
which sleeps meanwhile, and returns when the connection closed (``CLOSED``) or when a request
needs what only the greenlet exchange (``http_greenlet``) does (``http_conn.Resume``, or None:
read and parse the next request there): a request body, ``Expect: 100-continue``, an upgrade
or an ``Upgrade`` offer to strip, a malformed head, an endpoint without an idle pooled
connection (dialling), a response that is chunked, close-delimited or larger than
``FAST_BODY`` bytes, a 1xx or 101 response, or a status the route retries. The greenlet path
then hands the connection back for the next request. What to retry, what to pool and
how to word a failure are ``http_exchange``'s decisions, the same the greenlet path takes.

Heads are parsed once per distinct head (``_Memo``, bounded): the parsers are pure, their
results immutable, and the same client and endpoint repeat the same heads — measured, parsing
was most of the Python time of a small request.

A request is dispatched only when the pooled connection took its whole head in one ``send``;
anything that goes wrong before the first response byte hands the request over untouched
(a request without a body may be sent again). Responses are buffered only up to
``FAST_BODY``; a client slower than the response waits on a write watcher (back-pressure: the
next request is not read meanwhile). Deadlines come from the shared watchdog, whose
``expire()`` is moved onto the hub with ``run_callback``.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import gevent
from gevent.hub import Waiter

from edgemesh.meta.store import Backend
from edgemesh.proxy.http_conn import CLOSED, RECV_SIZE, ConnState, Resume, malformed
from edgemesh.proxy.http_exchange import (
    client_continues,
    failure_reply,
    needs_cleaning,
    reusable,
    should_retry,
    timeout_failure,
)
from edgemesh.proxy.http_head import (
    Framing,
    HeadError,
    HeadLimits,
    RequestHead,
    ResponseHead,
    head_end,
    parse_request_head,
    parse_response_framing,
)
from edgemesh.proxy.http_pool import Pooled
from edgemesh.proxy.http_router import Failure, Forward, Reply
from edgemesh.runtime import metrics

log = logging.getLogger(__name__)

READ, WRITE = 1, 2
FAST_BODY = 65536  # response bodies up to this size are read whole on the fast path
MEMO_HEAD = 1024  # heads up to this size are remembered parsed ...
MEMO_ENTRIES = 1024  # ... this many of each kind (about 1 MiB at most)


class _Memo:
    """Parsed heads by their exact bytes. The parsers are pure and their results frozen, and
    clients and endpoints repeat the same heads (same client, path and fields; same endpoint
    answer with the same length): a repeat costs a dict lookup instead of a parse."""

    def __init__(self) -> None:
        self.requests: dict[tuple[bytes, HeadLimits], tuple[RequestHead, bool]] = {}
        self.responses: dict[tuple[bytes, bytes, HeadLimits], ResponseHead] = {}

    def request(self, raw: bytes, limits: HeadLimits) -> tuple[RequestHead, bool]:
        """The parsed head, and whether the callback path may serve it (no body, no
        ``Expect``, no upgrade and nothing to strip before routing)."""
        key = (raw, limits)
        known = self.requests.get(key)
        if known is None:
            head = parse_request_head(raw, limits)
            known = head, (head.framing is Framing.NONE and not head.upgrade
                           and not head.expect_continue and not needs_cleaning(head))
            if len(raw) <= MEMO_HEAD:
                if len(self.requests) >= MEMO_ENTRIES:
                    self.requests.clear()
                self.requests[key] = known
        return known

    def response(self, raw: bytes, method: bytes, limits: HeadLimits) -> ResponseHead:
        key = (raw, method, limits)
        head = self.responses.get(key)
        if head is None:
            head = parse_response_framing(raw, method, limits)
            if len(raw) <= MEMO_HEAD:
                if len(self.responses) >= MEMO_ENTRIES:
                    self.responses.clear()
                self.responses[key] = head
        return head


MEMO = _Memo()
CALLBACK_ERRORS = metrics.counter("edgemesh_http_callback_errors_total",
                                  "Unexpected errors in the HTTP fast path (bugs).")


class Fast:
    """The callback state of one client connection (see the module docstring)."""
    __slots__ = ("conn", "loop", "sock", "cw", "ww", "waiter", "head", "raw", "fwd",
                 "started", "backend", "upstream", "rbuf", "rhead", "rend", "pending",
                 "keep_after", "client_eof", "on_upstream_cb", "scanned")

    def __init__(self, conn: ConnState) -> None:
        self.conn = conn
        self.loop = gevent.get_hub().loop
        self.sock: Any = conn.client._sock  # type: ignore[attr-defined]  # non-blocking
        self.cw = self.loop.io(self.sock.fileno(), READ)
        self.ww: Any = None
        self.waiter: Waiter | None = None
        self.head: RequestHead | None = None
        self.raw = b""
        self.fwd: Forward | None = None
        self.started = 0.0
        self.backend: Backend | None = None
        self.upstream: Pooled | None = None
        self.on_upstream_cb = self.on_upstream
        self.rbuf = b""
        self.rhead: ResponseHead | None = None
        self.rend = 0
        self.pending = b""
        self.keep_after = False
        self.client_eof = False
        self.scanned = 0  # leading bytes of conn.buf searched for a head end without one

    def run(self) -> object:
        """Serve requests on callbacks; CLOSED, or what the greenlet path must do next."""
        self.scanned = 0  # the greenlet path may have consumed part of conn.buf meanwhile
        waiter = self.waiter = Waiter()
        self.conn.fast = self
        try:
            self.cw.start(self.on_client)  # stays started: no epoll_ctl per request
            self._next()  # bytes already buffered are served at once
            return waiter.get()
        finally:
            self.conn.fast = None
            self.waiter = None
            self._stop()

    def close(self) -> None:
        """The connection is over: free the watchers (and the cycles through their callbacks)."""
        self._stop()
        for w in (self.cw, self.ww):
            if w is not None:
                w.close()
        self.ww = self.on_upstream_cb = None  # type: ignore[assignment]

    # ---- leaving the fast path ----------------------------------------------------------------

    def _stop(self) -> None:
        self.cw.stop()
        if self.ww is not None:
            self.ww.stop()
        self.conn.deadline = 0.0

    def _leave(self, result: object) -> None:
        self._stop()
        if self.upstream is not None:  # a request in flight that nobody will finish
            self._drop_upstream()
        waiter = self.waiter
        if waiter is not None:
            waiter.switch(result)

    def _hand_over(self, response: tuple[ResponseHead, bytes, bytes] | None = None,
                   exclude: set[Backend] | None = None) -> None:
        """Give the request in flight (or, without one, the next request) to the greenlet.

        With a ``response``, the upstream connection goes along; without, an endpoint picked
        and not released is the one the greenlet path tries first."""
        if self.head is None or self.fwd is None:
            self._leave(None)
            return
        step = Resume(self.head, self.raw, self.fwd, self.started, exclude or set())
        entry = self.upstream
        if response is not None and entry is not None:
            entry.watcher.stop()
            entry.watcher.close()
            step.backend, step.upstream, step.response = self.backend, entry.sock, response
        else:
            step.picked = self.backend
            if entry is not None:
                entry.close()
        self.upstream = self.backend = None  # the greenlet path finishes and releases
        self.head = self.fwd = None
        self._leave(step)

    def _release(self) -> None:
        if self.backend is not None and self.fwd is not None:
            self.fwd.balancer.release(self.backend)
        self.backend = self.upstream = None

    def _drop_upstream(self) -> None:
        """Close the upstream connection of the request in flight and release its endpoint."""
        if self.upstream is not None:
            self.upstream.close()
        self._release()

    def _failed(self, exc: BaseException) -> None:
        CALLBACK_ERRORS.inc()
        log.error("http fast path failed", exc_info=exc)
        self._leave(CLOSED)

    # ---- reading a request --------------------------------------------------------------------

    def _next(self) -> None:
        """Serve the next request if its head is buffered, else wait for it."""
        conn = self.conn
        self.head = self.fwd = None
        if conn.buf:
            conn.deadline = time.monotonic() + conn.limits.head_timeout
            self._try_head()
        elif self.client_eof:
            self._leave(CLOSED)
        else:
            conn.deadline = time.monotonic() + conn.limits.idle_timeout
            if not self.cw.active:
                self.cw.start(self.on_client)

    def on_client(self) -> None:
        try:
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            conn = self.conn
            busy = self.head is not None or self.pending
            if not data:
                if not busy:
                    self._leave(CLOSED)
                    return
                self.client_eof = True  # the answer in flight still goes out
                self.cw.stop()
                return
            if conn.buf:
                conn.buf += data
            else:
                conn.buf = data
                self.scanned = 0
                if not busy:
                    conn.deadline = time.monotonic() + conn.limits.head_timeout
            if busy:  # pipelined: kept for later, bounded by the head limit
                if len(conn.buf) > conn.limits.head.max_size:
                    self.cw.stop()
                return
            self._try_head()
        except Exception as e:
            self._failed(e)

    def _try_head(self) -> None:
        """Act on a complete request head at the start of the buffer, if there is one."""
        conn = self.conn
        buf = conn.buf
        try:
            end = head_end(buf, conn.limits.head, start=self.scanned)
            if end < 0:
                self.scanned = len(buf)  # a head sent in many pieces is searched once
                if self.client_eof:
                    self._leave(CLOSED)
                return
            raw = buf[:end]
            head, fast = MEMO.request(raw, conn.limits.head)
        except HeadError:
            self._leave(None)  # the greenlet path parses it again and answers
            return
        if not fast:
            self._leave(None)
            return
        conn.buf = buf[end:]
        self.scanned = 0
        self.started = time.monotonic()
        decision = conn.router.decide(head, raw, conn.client_ip)
        if isinstance(decision, Reply):
            conn.router.count(decision.status, self.started)
            self._send(decision.data, decision.keep and head.keep_alive)
            return
        self.head, self.raw, self.fwd = head, raw, decision
        self._dispatch(decision)

    # ---- the upstream side --------------------------------------------------------------------

    def _dispatch(self, fwd: Forward) -> None:
        backend = fwd.balancer.pick(fwd.backends, fwd.key)
        if backend is None:
            self._hand_over()
            return
        self.backend = backend
        entry = self.conn.pool.borrow(backend)
        if entry is None:
            self._hand_over()  # to dial
            return
        self.upstream = entry
        entry.watcher.callback = self.on_upstream_cb
        wire = fwd.wire
        try:
            sent = entry.sock._sock.send(wire)  # type: ignore[attr-defined]
        except OSError:
            sent = -1
        if sent != len(wire):  # closed meanwhile, or a full buffer: the greenlet path copes
            self._hand_over()
            return
        self.rbuf = b""
        self.rhead = None
        self.conn.deadline = time.monotonic() + fwd.wait(self.conn.limits.response_timeout)

    def on_upstream(self) -> None:
        try:
            entry = self.upstream
            if entry is None:
                return
            try:
                data = entry.sock._sock.recv(RECV_SIZE)  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._upstream_closed()
                return
            self.rbuf = rbuf = self.rbuf + data if self.rbuf else data
            if self.rhead is None and not self._response_head(rbuf):
                return
            rhead = self.rhead
            assert rhead is not None
            if len(rbuf) - self.rend >= rhead.length:
                self._respond(rhead)
        except Exception as e:
            self._failed(e)

    def _upstream_closed(self) -> None:
        if not self.rbuf:  # a pooled connection the endpoint had closed: send it again
            self._hand_over()
            return
        self._fail(Failure.BAD_RESPONSE, 502, "endpoint closed the connection before a "
                                              "complete response head")

    def _response_head(self, rbuf: bytes) -> bool:
        """Parse the response head once complete; False while more is needed or when the
        response left the fast path."""
        conn = self.conn
        head = self.head
        assert head is not None and self.fwd is not None
        try:
            end = head_end(rbuf, conn.limits.head, request=False)
            if end < 0:
                return False
            rhead = MEMO.response(rbuf[:end], head.method, conn.limits.head)
        except HeadError as e:
            malformed("endpoint", e, str(self.backend))
            self._fail(Failure.BAD_RESPONSE, 502, f"bad response from an endpoint: {e}")
            return False
        fwd = self.fwd
        if should_retry(fwd, rhead.status, 0, conn.limits):
            backend = self.backend
            self._drop_upstream()
            self._hand_over(exclude={backend} if backend is not None else None)
            return False
        if (rhead.status < 200  # 1xx and 101 too: the greenlet path decides
                or rhead.length > FAST_BODY
                or rhead.framing not in (Framing.NONE, Framing.LENGTH)):
            self._hand_over((rhead, rbuf[:end], rbuf[end:]))
            return False
        self.rhead, self.rend = rhead, end
        return True

    def _respond(self, rhead: ResponseHead) -> None:
        """The whole response is buffered: pool the upstream connection, send the response."""
        head, fwd, rbuf, end = self.head, self.fwd, self.rbuf, self.rend
        assert head is not None and fwd is not None
        stop = end + rhead.length
        pooled = reusable(head, rhead, True, len(rbuf) == stop)
        if fwd.edit_response is not None:
            out = fwd.edit_response(rbuf[:end]) + rbuf[end:stop]
        else:
            out = rbuf if len(rbuf) == stop else rbuf[:stop]
        if pooled and self.upstream is not None:
            self.conn.pool.give_back(self.upstream)
            self._release()
        else:
            self._drop_upstream()
        self.rbuf = b""
        self.conn.router.count(rhead.status, self.started)
        self._send(out, client_continues(head, rhead, True))

    def _fail(self, failure: Failure, status: int, detail: str) -> None:
        """Answer a failure of the request in flight as the router words it."""
        self._drop_upstream()
        head = self.head
        keep = head is not None and head.keep_alive
        reply = failure_reply(self.conn.router, failure, status, detail, keep, self.started)
        if reply is None:
            self._leave(CLOSED)
            return
        self._send(reply.data, reply.keep)

    # ---- writing to the client ----------------------------------------------------------------

    def _send(self, data: bytes, keep: bool) -> None:
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._leave(CLOSED)
            return
        if sent < len(data):
            self.pending, self.keep_after = data[sent:], keep
            if self.ww is None:
                self.ww = self.loop.io(self.sock.fileno(), WRITE)
            self.ww.start(self.on_writable)
            self.conn.deadline = time.monotonic() + self.conn.limits.body_timeout
            return
        if keep:
            self._next()
        else:
            self._leave(CLOSED)

    def on_writable(self) -> None:
        try:
            self.ww.stop()
            data, self.pending = self.pending, b""
            self._send(data, self.keep_after)
        except Exception as e:
            self._failed(e)

    # ---- deadlines ----------------------------------------------------------------------------

    def expire(self) -> None:
        """Called by the watchdog (not on the hub): act from a hub callback."""
        self.loop.run_callback(self._expired)

    def _expired(self) -> None:
        if self.waiter is None or self.conn.deadline:  # left, or a new phase began meanwhile
            return
        try:
            if self.upstream is not None and self.fwd is not None:
                self._fail(*timeout_failure(self.fwd, self.conn.limits))
            elif self.conn.buf and not self.pending:
                self._stop()
                self.head = None
                self._fail(Failure.HEAD_TIMEOUT, 408, "request head timeout")
            else:
                self._leave(CLOSED)
        except Exception as e:
            self._failed(e)
