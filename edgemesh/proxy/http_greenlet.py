"""The HTTP engine's general path: one exchange at a time in the connection's greenlet.

Everything the callback path (``httpflow``) does not do runs here: request bodies, chunked,
close-delimited or large responses, 1xx responses, upgrades, dialling, malformed requests and
failures. Decisions (retry, reuse, upgrades, failure replies) come from ``http_exchange``, the
same ones the callback path takes.

A request body is moved by its own greenlet (``_Upload``) while the response head is awaited,
so an early answer (``417`` to ``Expect: 100-continue``, ``413`` during an upload) is seen at
once and relayed; the upstream connection is then closed rather than pooled (the endpoint did
not get the whole request), and the client connection closes after the response with a
bounded lingering close. A malformed request body is the client's fault: 400 (if no response
byte was sent yet), counted per cause, and the connection closes.
"""
from __future__ import annotations

import logging
import socket
import time

import gevent

from edgemesh.errors import UnavailableError
from edgemesh.meta.store import Backend
from edgemesh.proxy.http_body import BodyTracker
from edgemesh.proxy.http_conn import (
    RECV_SIZE,
    ConnState,
    Resume,
    malformed,
    send_all,
    shutdown,
)
from edgemesh.proxy.http_exchange import (
    bad_101,
    clean_request,
    client_continues,
    closing_head,
    failure_reply,
    is_final,
    relay_interim,
    reusable,
    should_retry,
    timeout_failure,
    upgrade_allowed,
)
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
from edgemesh.runtime import pump, tasks
from edgemesh.runtime.logs import Once

log = logging.getLogger(__name__)
_once = Once()


class _ClientGone(Exception):
    """The client closed, reset or stalled; nothing more can be said to it."""


class _Failed(Exception):
    """The exchange failed before any response byte reached the client."""

    def __init__(self, failure: Failure, status: int, detail: str) -> None:
        super().__init__(detail)
        self.failure, self.status, self.detail = failure, status, detail


class _Upload:
    """The rest of a request body on its way upstream, moved by its own greenlet."""
    __slots__ = ("greenlet", "sent", "bad", "gone")

    def __init__(self) -> None:
        self.greenlet: gevent.Greenlet | None = None
        self.sent = False  # the whole body went upstream
        self.bad: HeadError | None = None  # the client's body was malformed
        self.gone = False  # the client closed, stalled or sent too much

    def stop(self) -> bool:
        """End the upload if still running; True if the whole body went upstream."""
        if self.greenlet is not None:
            self.greenlet.kill()
            self.greenlet = None
        return self.sent


class Connection(ConnState):
    """One client connection on the greenlet path (see the module docstring)."""
    __slots__ = ("upstream", "awaiting_head", "reading_head", "expired", "plain", "upload")

    def __init__(self, client: socket.socket, client_ip: str, router: Router,
                 pool: UpstreamPool, limits: HttpLimits, plain: bool) -> None:
        super().__init__(client, client_ip, router, pool, limits)
        self.upstream: socket.socket | None = None  # the endpoint of the request in flight
        self.awaiting_head = False  # waiting for the endpoint's response head
        self.reading_head = False  # waiting for the rest of a request head
        self.expired = False
        self.plain = plain  # the client socket is a plain one (not TLS)
        self.upload: _Upload | None = None  # a request body moving upstream

    def expire(self) -> None:
        """The current phase ran out of time: unblock whoever waits."""
        self.deadline = 0.0
        if self.fast is not None:
            self.fast.expire()
            return
        self.expired = True
        shutdown(self.upstream)
        if self.upload is not None and self.upload.greenlet is not None:
            shutdown(self.client, socket.SHUT_RD)  # a stalled upload: 408, if anything
        elif self.reading_head:  # the client may still get its 408
            shutdown(self.client, socket.SHUT_RD)
        elif not self.awaiting_head:  # else the client still gets its 504
            shutdown(self.client)

    def serve(self, step: Resume | None) -> bool:
        """Serve the request handed over (or the next one); True if the connection goes on."""
        try:
            return self._resume(step) if step is not None else self._one_request()
        except _ClientGone:
            return False

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
        scanned = 0  # a head sent in many small pieces is searched once, not once a piece
        try:
            while True:
                end = head_end(buf, limits.head, start=scanned)
                if end >= 0:
                    self.buf = buf[end:]
                    return buf[:end]
                scanned = len(buf)
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
        reply = failure_reply(self.router, failure, status, detail, keep, started)
        if reply is None:
            return False
        try:
            self.client.sendall(reply.data)
        except OSError:
            return False
        return reply.keep

    def _refuse(self, error: HeadError, started: float) -> bool:
        """A malformed request: the client's fault, answered (400, 505, ...) and closed."""
        malformed("client", error, self.client_ip)
        self.linger = True  # what follows the bad part may still be on its way
        return self.answer(Failure.BAD_REQUEST, error.status, str(error), started)

    # ---- one request ---------------------------------------------------------------------------

    def _one_request(self) -> bool:
        """Read, decide and proxy one request; True if the connection may go on."""
        started = time.monotonic()
        try:
            raw = self._read_request_head()
            if raw is None:
                return False
            head = parse_request_head(raw, self.limits.head)
            head, raw = clean_request(head, raw, self.limits.head)
        except HeadError as e:
            return self._refuse(e, started)
        except _Failed as e:
            return self.answer(e.failure, e.status, e.detail, started)
        max_body = self.limits.max_body
        if max_body and head.framing is Framing.LENGTH and head.length > max_body:
            self.linger = True
            return self.answer(Failure.BAD_REQUEST, 413, "request body too large", started)
        decision = self.router.decide(head, raw, self.client_ip)
        if isinstance(decision, Reply):
            self.router.count(decision.status, started)
            self._send_client(decision.data)
            if head.framing is not Framing.NONE:
                self.linger = True
            return decision.keep and head.framing is Framing.NONE and head.keep_alive
        return self._exchange(Resume(head, raw, decision, started, set()))

    def _resume(self, step: Resume) -> bool:
        if step.response is None:
            return self._exchange(step)
        assert step.backend is not None and step.upstream is not None
        body = BodyTracker(Framing.NONE)
        try:
            return self._finish(step, body, step.backend, step.upstream, None, *step.response)
        finally:
            step.fwd.balancer.release(step.backend)

    def _exchange(self, step: Resume) -> bool:
        """Proxy one request and its response; True if the client connection may go on."""
        head, fwd = step.head, step.fwd
        body = BodyTracker(head.framing, head.length)
        try:
            try:
                out = fwd.wire + self._body_start(body)
            except HeadError as e:
                return self._refuse(e, step.started)
            return self._attempts(step, body, out)
        finally:
            if not body.done:  # the rest of the body may still be on its way
                self.linger = True

    def _attempts(self, step: Resume, body: BodyTracker, out: bytes) -> bool:
        head, fwd = step.head, step.fwd
        replayable = body.done and not head.upgrade
        while True:
            try:
                backend, upstream, fresh = self._connect(fwd, step.exclude, not replayable,
                                                         step.picked)
                step.picked = None
            except _Failed as e:
                return self.answer(e.failure, e.status, e.detail, step.started,
                                   keep=replayable and head.keep_alive)
            upload = None
            try:
                upstream, resp, upload = self._attempt(head, out, body, upstream, fresh,
                                                       backend, fwd)
                if should_retry(fwd, resp[0].status, len(step.exclude), self.limits,
                                replayable):
                    upstream.close()
                    step.exclude.add(backend)
                    continue
                return self._finish(step, body, backend, upstream, upload, *resp)
            except _Failed as e:
                upstream.close()
                return self.answer(e.failure, e.status, e.detail, step.started,
                                   keep=replayable and head.keep_alive)
            except _ClientGone:
                upstream.close()
                raise
            finally:
                if upload is not None:
                    upload.stop()
                self.upload = None
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
                 ) -> tuple[socket.socket, tuple[ResponseHead, bytes, bytes], _Upload | None]:
        """Send the request (once more on a fresh connection if a pooled one proves closed);
        the connection used, the final response head, its bytes and what followed it, and
        the upload still moving the request body (if any)."""
        try:
            try:
                got = self._send_and_read(head, out, body, upstream, fresh, fwd)
                if got is None:  # a stale pooled connection: once more on a fresh one
                    upstream.close()
                    upstream = self.pool.dial(backend, self.limits.connect_timeout)
                    got = self._send_and_read(head, out, body, upstream, True, fwd)
                    if got is None:
                        raise _Failed(Failure.NO_ANSWER, 502,
                                      "endpoint closed the connection without answering")
            finally:
                self.upstream = None
        except UnavailableError:
            raise _Failed(Failure.UNREACHABLE, 502, "cannot reach any endpoint") from None
        except HeadError as e:
            malformed("endpoint", e, str(backend))
            raise _Failed(Failure.BAD_RESPONSE, 502, f"bad response from an endpoint: {e}"
                          ) from None
        return upstream, got[0], got[1]

    def _body_start(self, body: BodyTracker) -> bytes:
        """The part of the request body already read with its head."""
        if body.done or not self.buf:
            return b""
        n = body.feed(self.buf)
        first, self.buf = self.buf[:n], self.buf[n:]
        return first

    def _send_and_read(self, head: RequestHead, out: bytes, body: BodyTracker,
                       upstream: socket.socket, fresh: bool, fwd: Forward
                       ) -> tuple[tuple[ResponseHead, bytes, bytes], _Upload | None] | None:
        """Send the request head, start moving its body, read the final response head.

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
        upload = None
        if not body.done:  # it moves while the answer is awaited: an early one is seen
            upload = self.upload = _Upload()
            upload.greenlet = tasks.spawn("http-body", self._upload, body, upstream, upload,
                                          fwd)
        try:
            got = self._final_head(head, upstream, b"", fwd, retry_ok)
        except BaseException:
            if upload is not None:
                upload.stop()
            raise
        return None if got is None else (got, upload)

    def _upload(self, body: BodyTracker, upstream: socket.socket, upload: _Upload,
                fwd: Forward) -> None:
        try:
            self._pump_body(body, upstream)
            upload.sent = True
        except HeadError as e:  # the client's fault: no answer from the endpoint will do
            malformed("client", e, self.client_ip)
            upload.bad = e
            shutdown(upstream)
        except _ClientGone as e:
            log.debug("request body stopped: %s", e)
            upload.gone = True
            shutdown(upstream)
        except UnavailableError as e:  # the endpoint stopped reading: its answer may follow
            log.debug("request body stopped: %s", e)
        finally:
            upload.greenlet = None
            if self.awaiting_head:
                self.deadline = time.monotonic() + fwd.wait(self.limits.response_timeout)

    def _final_head(self, head: RequestHead, upstream: socket.socket, buf: bytes,
                    fwd: Forward, retry_ok: bool) -> tuple[ResponseHead, bytes, bytes] | None:
        """Read response heads, relaying 1xx ones, up to the final one (or 101)."""
        while True:
            got = self._read_response_head(upstream, buf, head.method, fwd, retry_ok)
            if got is None:
                return None
            rhead, rraw, buf = got
            if is_final(rhead):
                return rhead, rraw, buf
            if relay_interim(head):  # 100 Continue, 103 Early Hints, ...
                self._send_client(rraw)
            retry_ok = False

    def _read_response_head(self, upstream: socket.socket, buf: bytes, method: bytes,
                            fwd: Forward, retry_ok: bool
                            ) -> tuple[ResponseHead, bytes, bytes] | None:
        limits = self.limits
        self.deadline = time.monotonic() + fwd.wait(limits.response_timeout)
        self.awaiting_head = True
        scanned = 0
        try:
            while True:
                end = head_end(buf, limits.head, request=False, start=scanned) if buf else -1
                if end >= 0:
                    return (parse_response_framing(buf[:end], method, limits.head), buf[:end],
                            buf[end:])
                scanned = len(buf)
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
        """The endpoint closed (or we did: a deadline, or the upload's end) before a complete
        response head; returns only when the request may be retried on a fresh connection."""
        upload = self.upload
        if upload is not None:
            running = upload.greenlet
            if running is not None and self.expired:
                running.join(timeout=1.0)  # expiry shut the client's reading: the upload ends
            if upload.bad is not None:
                raise _Failed(Failure.BAD_REQUEST, upload.bad.status,
                              f"malformed request body: {upload.bad}")
            if upload.gone:
                if self.expired:
                    self.expired = False
                    raise _Failed(Failure.HEAD_TIMEOUT, 408, "request body timeout")
                raise _ClientGone("closed inside a request body")
        if self.expired:
            self.expired = False
            raise _Failed(*timeout_failure(fwd, self.limits))
        if not (retry_ok and not buf):
            raise HeadError("endpoint closed the connection before a complete response head",
                            502, "no_response_head")

    def _pump_body(self, body: BodyTracker, upstream: socket.socket) -> None:
        """Forward the rest of the request body from the client."""
        limits = self.limits
        max_body, sent = limits.max_body, 0
        slowest = time.monotonic() + limits.body_rate_grace  # when 0 bytes is too slow
        while not body.done:
            # the next read may wait body_timeout, but not past the body's minimum rate
            rate_due = slowest + sent / limits.body_min_rate - time.monotonic()
            data = self._recv_client(max(0.0, min(limits.body_timeout, rate_due)))
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
                upstream: socket.socket, upload: _Upload | None, rhead: ResponseHead,
                rraw: bytes, rest: bytes) -> bool:
        """Relay the response whose head was read; True if the client connection may go on."""
        head, fwd = step.head, step.fwd
        pooled = False
        try:
            if not is_final(rhead):  # from the callback path
                if relay_interim(head):
                    self._send_client(rraw)
                got = self._final_head(head, upstream, rest, fwd, False)
                assert got is not None
                rhead, rraw, rest = got
            if rhead.status == 101:
                if not upgrade_allowed(head, rhead):
                    raise _Failed(*bad_101())
                self.router.count(101, step.started)
                self._send_client(rraw + rest)
                self.deadline = 0.0  # an upgraded connection has its own idle timeout
                self._splice(upstream)
                return False
            if fwd.edit_response is not None:
                rraw = fwd.edit_response(rraw)
            early = not body.done  # answered before the whole request was read
            if early and client_continues(head, rhead, True):
                rraw = closing_head(rraw)
            clean = self._relay_response(rhead, rraw, rest, upstream, str(backend))
            self.router.count(rhead.status, step.started)
            sent = upload.stop() if upload is not None else body.done
            pooled = reusable(head, rhead, sent, clean)
            return client_continues(head, rhead, not early)
        except _Failed as e:
            return self.answer(e.failure, e.status, e.detail, step.started)
        except HeadError as e:
            malformed("endpoint", e, str(backend))
            return self.answer(Failure.BAD_RESPONSE, 502, f"bad response from an endpoint: {e}",
                               step.started)
        finally:
            if pooled:
                self.pool.put(backend, upstream)
            else:
                upstream.close()

    def _relay_response(self, rhead: ResponseHead, rraw: bytes, rest: bytes,
                        upstream: socket.socket, peer: str) -> bool:
        """Send the response to the client as it comes; True if it was read whole and
        nothing followed it. A malformed response before its first byte went out raises
        ``HeadError`` (502); after, the client connection is closed."""
        if rhead.framing is Framing.LENGTH and len(rest) == rhead.length:  # the common case
            self._send_client(rraw + rest)
            return True
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
            try:
                n = body.feed(data)
            except HeadError as e:  # response bytes already went out: only closing is left
                malformed("endpoint", e, peer)
                raise _ClientGone("endpoint broke a response body") from None
            clean = clean and n == len(data)
            self._send_client(data if n == len(data) else data[:n])
        return clean

    def _splice(self, upstream: socket.socket) -> None:
        """After 101: bytes both ways until either side closes (half-closes propagated)."""
        if self.buf:
            upstream.sendall(self.buf)
            self.buf = b""
        pump.both_ways(self.client, upstream, idle_timeout=self.limits.tunnel_idle_timeout)

