"""The HTTP engine's decisions, shared by both execution paths: no sockets, no gevent.

``httpflow`` (libev callbacks, the common case) and ``http_greenlet`` (everything else) do the
I/O; what they decide about one exchange is decided here, over plain values, once:

- ``clean_request``: hop-by-hop ``Upgrade`` offers other than WebSocket (h2c, TLS/1.x, ...)
  and ``HTTP2-Settings`` are removed from the head, with their ``Connection`` tokens, before
  any router sees it, so no endpoint is ever offered another protocol behind our back;
- ``upgrade_allowed``: a ``101`` is relayed (and the connection spliced) only after a
  WebSocket handshake request; any other ``101`` is the endpoint's fault;
- ``should_retry``: a status the route retries, on another endpoint, while attempts remain;
- ``reusable``: an upstream connection goes back to the pool only when both messages on it
  are complete (request fully sent, response fully read with nothing after it), neither side
  said ``Connection: close`` and nothing was upgraded;
- ``client_continues``: the client connection serves another request only when its request
  was read whole, it asked to keep alive and the response was not close-delimited. After an
  early answer (a final response before the request body was read: ``Expect: 100-continue``
  refused, 413, ...) the connection closes after the response (RFC 9112 §9.3, RFC 9110
  §10.1.1), which says so (``closing_head`` adds ``Connection: close``, RFC 9112 §9.6), with a
  bounded lingering close (``LINGER_BYTES``, ``LINGER_SECONDS``) so the client reads the
  answer rather than a reset. The rest of the body the endpoint did not wait for is not
  forwarded once the response is complete;
- ``relay_interim``: 1xx responses go on to HTTP/1.1 clients only (RFC 9110 §15.2);
- ``timeout_failure`` and ``failure_reply``: what a timeout and any failure look like.
"""
from __future__ import annotations

from edgemesh.proxy.http_head import (
    Framing,
    HeadLimits,
    RequestHead,
    ResponseHead,
    parse_request_head,
)
from edgemesh.proxy.http_router import Failure, Forward, HttpLimits, Reply, Router

LINGER_BYTES = 1 << 20  # after an early answer: request body bytes read and discarded, at most
LINGER_SECONDS = 2.0  # ... for at most this long, before the client connection is closed

_CLOSE = Framing.CLOSE  # an enum member looked up once: these run on every request
_HOP_UPGRADE = (b"upgrade", b"http2-settings")  # fields dropped from a non-WebSocket offer
_UPGRADE_INITIALS = frozenset(b"UuHhCc")  # upgrade, http2-settings, connection


def needs_cleaning(head: RequestHead) -> bool:
    """The head offers a protocol change other than a WebSocket handshake."""
    if head.upgrade == b"websocket":
        return False
    initials = _UPGRADE_INITIALS
    for name, value in head.headers:
        if name[0] not in initials:
            continue
        n = name.lower()
        if n in _HOP_UPGRADE:
            return True
        if n == b"connection" and any(t.strip().lower() in _HOP_UPGRADE
                                      for t in value.split(b",")):
            return True
    return False


def clean_request(head: RequestHead, raw: bytes, limits: HeadLimits
                  ) -> tuple[RequestHead, bytes]:
    """The head (and its bytes) as it may go upstream: see the module docstring.

    A WebSocket handshake passes untouched; anything else offering ``Upgrade`` or
    ``HTTP2-Settings`` loses those fields and their ``Connection`` tokens (a ``Connection``
    field left without tokens is dropped)."""
    if not needs_cleaning(head):
        return head, raw
    lines = raw.split(b"\r\n")
    kept = [lines[0]]
    for line in lines[1:-2]:  # the head ends with an empty line: b"...\r\n\r\n"
        name, _, value = line.partition(b":")
        n = name.lower()
        if n in _HOP_UPGRADE:
            continue
        if n == b"connection":
            tokens = [t.strip() for t in value.split(b",")]
            tokens = [t for t in tokens if t and t.lower() not in _HOP_UPGRADE]
            if not tokens:
                continue
            line = name + b": " + b", ".join(tokens)
        kept.append(line)
    cleaned = b"\r\n".join(kept) + b"\r\n\r\n"
    return parse_request_head(cleaned, limits), cleaned


def upgrade_allowed(head: RequestHead, rhead: ResponseHead) -> bool:
    """A ``101`` may be relayed and the connection spliced: only after a WebSocket
    handshake request (the only upgrade ``clean_request`` lets through)."""
    return rhead.status == 101 and head.upgrade == b"websocket"


def is_final(rhead: ResponseHead) -> bool:
    """The response head ends the exchange's interim phase (a final status, or ``101``)."""
    return rhead.status >= 200 or rhead.status == 101


def relay_interim(head: RequestHead) -> bool:
    """1xx responses (``100 Continue``, ``103 Early Hints``) are sent on to this client."""
    return head.version == b"1.1"


def attempts(fwd: Forward, limits: HttpLimits) -> int:
    """How many endpoints one request may try."""
    return min(fwd.attempts or limits.connect_attempts, len(fwd.backends))


def should_retry(fwd: Forward, status: int, tried: int, limits: HttpLimits,
                 replayable: bool = True) -> bool:
    """Try another endpoint after ``status``? ``tried``: endpoints already given up on before
    this one; ``replayable``: the request can be sent again (its body was not consumed)."""
    return (replayable and fwd.retry_on is not None and fwd.retry_on(status)
            and tried + 1 < attempts(fwd, limits))


def reusable(head: RequestHead, rhead: ResponseHead, request_sent: bool,
             response_clean: bool) -> bool:
    """The upstream connection may go back to the pool (see the module docstring).

    ``request_sent``: the whole request, body included, went upstream; ``response_clean``:
    the whole response was read and the endpoint sent nothing after it."""
    return (request_sent and response_clean and rhead.keep_alive and head.keep_alive
            and not head.upgrade and rhead.framing is not _CLOSE and rhead.status != 101)


def client_continues(head: RequestHead, rhead: ResponseHead, request_read: bool) -> bool:
    """The client connection may carry another request after this response."""
    return (request_read and head.keep_alive and rhead.framing is not _CLOSE
            and rhead.status != 101)


def closing_head(rraw: bytes) -> bytes:
    """The response head ``rraw`` with ``Connection: close`` added after its status line:
    the client connection closes after this response (a ``close`` token wins over any
    ``keep-alive`` already there)."""
    end = rraw.index(b"\n") + 1
    return rraw[:end] + b"Connection: close\r\n" + rraw[end:]


def timeout_failure(fwd: Forward, limits: HttpLimits) -> tuple[Failure, int, str]:
    """What the client is told when no response head came in time."""
    wait = fwd.response_timeout or limits.response_timeout
    return Failure.TIMEOUT, 504, f"endpoint did not answer in {wait:g}s"


def bad_101() -> tuple[Failure, int, str]:
    """An endpoint switched protocols without a WebSocket handshake asking for it."""
    return Failure.BAD_RESPONSE, 502, "endpoint switched protocols unasked"


def failure_reply(router: Router, failure: Failure, status: int, detail: str, keep: bool,
                  started: float) -> Reply | None:
    """The router's answer to a failure, counted; None: close without one. ``keep``: the
    client connection could go on as far as the engine is concerned."""
    reply = router.failed(failure, status, detail, keep)
    if reply is None:
        return None
    router.count(reply.status, started)
    return Reply(reply.status, reply.data, reply.keep and keep)
