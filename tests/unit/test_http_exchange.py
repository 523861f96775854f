"""The HTTP engine's decisions (``http_exchange``) over plain values: no sockets, no gevent."""
from __future__ import annotations

import pytest

from edgemesh.meta.store import Backend
from edgemesh.proxy import http_exchange as ex
from edgemesh.proxy.http_head import (
    Framing,
    HeadLimits,
    RequestHead,
    ResponseHead,
    parse_request_head,
    parse_response_head,
)
from edgemesh.proxy.http_router import Failure, Forward, HttpLimits, Reply
from edgemesh.proxy.lb import Balancer, LBSpec


def req(*fields: str, method: str = "GET", version: str = "1.1") -> RequestHead:
    raw = f"{method} / HTTP/{version}\r\nHost: a\r\n" + "".join(f + "\r\n" for f in fields)
    return parse_request_head(raw.encode() + b"\r\n")


def resp(status: int = 200, *fields: str, method: bytes = b"GET") -> ResponseHead:
    raw = f"HTTP/1.1 {status} X\r\n" + "".join(f + "\r\n" for f in fields)
    return parse_response_head(raw.encode() + b"\r\n", method)


def fwd(n: int = 3, attempts: int = 0, retry: bool = True) -> Forward:
    return Forward(Balancer(LBSpec()), [Backend("10.0.0.1", 80 + i) for i in range(n)], None,
                   b"", attempts=attempts,
                   retry_on=(lambda status: status == 503) if retry else None)


# ---- upgrades ---------------------------------------------------------------------------------


def clean(*fields: str) -> tuple[RequestHead, bytes]:
    head = req(*fields)
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(f.encode() + b"\r\n" for f in fields) + \
        b"\r\n"
    return ex.clean_request(head, raw, HeadLimits())


def test_websocket_handshake_passes_untouched() -> None:
    fields = ("Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Key: k")
    head, raw = clean(*fields)
    assert head.upgrade == b"websocket" and b"Upgrade: websocket" in raw


@pytest.mark.parametrize("fields", [
    ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABk"),
    ("Connection: upgrade", "Upgrade: TLS/1.2"),
    ("Upgrade: h2c",),  # an offer without Connection: upgrade is hop-by-hop all the same
    ("Connection: keep-alive, Upgrade", "Upgrade: websocket, h2c"),
    ("HTTP2-Settings: AAMAAABk",),
])
def test_other_upgrade_offers_are_stripped(fields: tuple[str, ...]) -> None:
    head, raw = clean(*fields, "X-Keep: 1")
    low = raw.lower()
    assert b"upgrade" not in low and b"http2-settings" not in low
    assert head.upgrade == b"" and head.header(b"x-keep") == b"1"
    assert head == parse_request_head(raw)  # the head describes the bytes that go upstream
    if "keep-alive" in fields[0]:
        assert head.header(b"connection") == b"keep-alive"  # other tokens stay


def test_a_plain_request_is_not_rebuilt() -> None:
    head = req("Connection: keep-alive")
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n"
    assert ex.clean_request(head, raw, HeadLimits()) == (head, raw)
    assert not ex.needs_cleaning(head)


def test_101_only_after_a_websocket_handshake() -> None:
    switched = resp(101, "Upgrade: websocket", "Connection: Upgrade")
    ws = req("Connection: Upgrade", "Upgrade: websocket")
    assert ex.upgrade_allowed(ws, switched)
    assert not ex.upgrade_allowed(req(), switched)
    assert not ex.upgrade_allowed(ws, resp(200, "Content-Length: 0"))
    assert ex.bad_101()[:2] == (Failure.BAD_RESPONSE, 502)


def test_interim_responses_go_to_http11_clients_only() -> None:
    assert not ex.is_final(resp(100)) and not ex.is_final(resp(103))
    assert ex.is_final(resp(101)) and ex.is_final(resp(204))
    assert ex.relay_interim(req()) and not ex.relay_interim(req(version="1.0"))


# ---- retries ----------------------------------------------------------------------------------


def test_should_retry_within_attempts_and_endpoints() -> None:
    limits = HttpLimits(connect_attempts=3)
    assert ex.should_retry(fwd(), 503, 0, limits)
    assert ex.should_retry(fwd(), 503, 1, limits)
    assert not ex.should_retry(fwd(), 503, 2, limits)  # the third was the last attempt
    assert not ex.should_retry(fwd(), 200, 0, limits)
    assert not ex.should_retry(fwd(retry=False), 503, 0, limits)
    assert not ex.should_retry(fwd(n=1), 503, 0, limits)  # nowhere else to go
    assert not ex.should_retry(fwd(attempts=1), 503, 0, limits)
    assert not ex.should_retry(fwd(), 503, 0, limits, replayable=False)  # body consumed


# ---- reuse ------------------------------------------------------------------------------------


def test_reusable_only_when_both_messages_are_complete() -> None:
    head, ok = req(), resp(200, "Content-Length: 2")
    assert ex.reusable(head, ok, True, True)
    assert not ex.reusable(head, ok, False, True)  # request body not fully sent
    assert not ex.reusable(head, ok, True, False)  # response not read whole, or bytes after
    assert not ex.reusable(req("Connection: close"), ok, True, True)
    assert not ex.reusable(head, resp(200, "Content-Length: 2", "Connection: close"), True,
                           True)
    assert not ex.reusable(head, resp(200), True, True)  # close-delimited
    assert not ex.reusable(req("Connection: Upgrade", "Upgrade: websocket"), ok, True, True)
    assert not ex.reusable(head, resp(101), True, True)
    for status in (204, 304):
        assert ex.reusable(head, resp(status, "Content-Length: 10"), True, True)
    head_req = req(method="HEAD")
    assert ex.reusable(head_req, resp(200, "Content-Length: 10", method=b"HEAD"), True, True)


def test_client_continues_only_after_a_whole_request() -> None:
    ok = resp(200, "Content-Length: 2")
    assert ex.client_continues(req(), ok, True)
    assert not ex.client_continues(req(), ok, False)  # an early answer: close after it
    assert not ex.client_continues(req("Connection: close"), ok, True)
    assert not ex.client_continues(req(), resp(200), True)
    assert resp(200).framing is Framing.CLOSE


def test_closing_head_says_close() -> None:
    for raw in (b"HTTP/1.1 417 X\r\nContent-Length: 0\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
                b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"):
        closed = ex.closing_head(raw)
        head = parse_response_head(closed, b"POST")
        assert not head.keep_alive and closed.endswith(raw[raw.index(b"\n") + 1:])


# ---- failures ---------------------------------------------------------------------------------


class Router:
    def __init__(self, reply: Reply | None) -> None:
        self.reply, self.counted, self.asked = reply, [], []

    def decide(self, head, raw, client_ip):  # type: ignore[no-untyped-def]
        raise AssertionError

    def failed(self, failure, status, detail, keep):  # type: ignore[no-untyped-def]
        self.asked.append((failure, status, detail, keep))
        return self.reply

    def count(self, status, started):  # type: ignore[no-untyped-def]
        self.counted.append(status)


def test_timeout_failure_names_the_wait() -> None:
    assert ex.timeout_failure(fwd(), HttpLimits(response_timeout=7)) == (
        Failure.TIMEOUT, 504, "endpoint did not answer in 7s")
    f = fwd()
    f.response_timeout = 0.5
    assert ex.timeout_failure(f, HttpLimits())[2] == "endpoint did not answer in 0.5s"


def test_failure_reply_is_counted_and_keeps_only_when_both_agree() -> None:
    router = Router(Reply(502, b"x", True))
    reply = ex.failure_reply(router, Failure.BAD_RESPONSE, 502, "d", False, 0.0)
    assert reply is not None and not reply.keep and router.counted == [502]
    reply = ex.failure_reply(router, Failure.BAD_RESPONSE, 502, "d", True, 0.0)
    assert reply is not None and reply.keep
    silent = Router(None)
    assert ex.failure_reply(silent, Failure.HEAD_TIMEOUT, 408, "d", True, 0.0) is None
    assert silent.counted == []
