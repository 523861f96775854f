"""Fuzz targets for every parser of untrusted bytes on the HTTP and HTTPS paths: arbitrary
bytes may only ever yield a result or the module's own error, never another exception."""
from __future__ import annotations

import ssl

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgemesh.proxy.http_body import BodyTracker
from edgemesh.proxy.http_head import (
    CAUSES,
    Framing,
    HeadError,
    HeadLimits,
    head_end,
    parse_request_head,
    parse_response_framing,
    parse_response_head,
    valid_authority,
)
from edgemesh.proxy.tls_sni import SniStatus, client_hello_sni

SEEDS = [b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
         b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
         b"POST /x?y=1 HTTP/1.0\r\nCookie: a=b; c=\"d\"\r\nConnection: keep-alive\r\n\r\n",
         b"GET http://[::1]:8080/a%2Fb?c#d HTTP/1.1\r\nHost: x.y:80\r\nX-Blank:    \r\n\r\n",
         b"HTTP/1.0 404 Not Found\nContent-Length: 5, 5\nX: a\n  folded\n\n",
         b"OPTIONS * HTTP/2.0\r\nHost: [v1.a]\r\nTransfer-Encoding: chunked\r\n\r\n"]
CHUNK_SEEDS = [b"5;a=b;c=\"d\\\"e\" ; f = g \r\nhello\r\n0\r\nX: y\r\n\r\n",
               b"7fffffffffffffff\r\n", b"1\r\nx\r\n0;q\r\n\r\n"]
LIMITS = HeadLimits(max_size=2048, max_fields=20)


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    def mutate(seed: bytes, edits: list[tuple[int, bytes]]) -> bytes:
        for pos, chunk in edits:
            pos %= len(seed) + 1
            seed = seed[:pos] + chunk + seed[pos + len(chunk) % 3:]
        return seed
    return st.builds(mutate, st.sampled_from(seeds),
                     st.lists(st.tuples(st.integers(0, 4096), st.binary(max_size=6)),
                              max_size=6)) | st.binary(max_size=512)


@given(mutated(SEEDS))
@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
def test_heads_never_crash(data: bytes) -> None:
    for request in (True, False):
        try:
            end = head_end(data, LIMITS, request=request)
            if end > 0:
                if request:
                    head = parse_request_head(data[:end], LIMITS)
                    assert head.length >= 0 and len(head.headers) <= LIMITS.max_fields
                else:
                    parse_response_head(data[:end], b"GET", LIMITS)
        except HeadError as e:
            assert e.status in (400, 405, 431, 501, 502, 505)
            assert e.cause in CAUSES


def _h11_request(data: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    return event


@given(mutated(SEEDS))
@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
def test_accepted_requests_are_what_h11_reads_and_in_the_strict_grammar(data: bytes) -> None:
    """Whatever we accept, h11 accepts and reads the same way; its target is origin-form or
    absolute-form and its Host a valid authority, and its lengths fit in 63 bits."""
    try:
        end = head_end(data, LIMITS)
        head = parse_request_head(data[:end], LIMITS) if end > 0 else None
    except HeadError:
        return
    if head is None:
        return
    ref = _h11_request(data[:end])
    assert (ref.method, ref.target, ref.http_version) == (head.method, head.target, head.version)
    assert head.version in (b"1.0", b"1.1") and b"#" not in head.target
    assert head.target.startswith(b"/") or head.target.lower().startswith((b"http://",
                                                                          b"https://"))
    assert not head.host or valid_authority(head.host)
    assert 0 <= head.length < 2**63


@given(mutated(SEEDS[1:2] + SEEDS[4:5]), st.sampled_from([b"GET", b"HEAD"]))
@settings(max_examples=1000)
def test_response_framing_fast_path_agrees_with_the_full_parse(data: bytes,
                                                               method: bytes) -> None:
    def reading(parse):  # type: ignore[no-untyped-def]
        try:
            end = head_end(data, LIMITS, request=False)
            if end < 0:
                return None
            h = parse(data[:end], method, LIMITS)
        except HeadError as e:
            assert e.cause in CAUSES
            return e.status, e.cause
        return h.status, h.framing, h.length, h.keep_alive
    assert reading(parse_response_framing) == reading(parse_response_head)


@given(mutated(CHUNK_SEEDS), st.lists(st.integers(1, 16), max_size=6))
@settings(max_examples=1500)
def test_chunk_lines_never_crash(data: bytes, pieces: list[int]) -> None:
    tracker = BodyTracker(Framing.CHUNKED)
    pos = 0
    try:
        for size in pieces + [len(data)]:
            n = tracker.feed(data[pos:pos + size])
            assert 0 <= n <= size
            pos += n
    except HeadError as e:
        assert e.cause in CAUSES


@given(mutated(SEEDS), st.sampled_from(list(Framing)), st.integers(0, 100),
       st.lists(st.integers(1, 64), max_size=8))
@settings(max_examples=1000)
def test_body_tracker_never_overconsumes(data: bytes, framing: Framing, length: int,
                                         pieces: list[int]) -> None:
    tracker = BodyTracker(framing, length)
    pos = 0
    try:
        for size in pieces + [len(data)]:
            piece = data[pos:pos + size]
            n = tracker.feed(piece)
            assert 0 <= n <= len(piece)
            pos += n
            if n < len(piece) or pos >= len(data):
                break
    except HeadError:
        pass


def _hello() -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="fuzz.example")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


@given(mutated([_hello()]))
@settings(max_examples=1500)
def test_sni_never_crashes(data: bytes) -> None:
    result = client_hello_sni(data)
    assert result.status in SniStatus
    if result.status is SniStatus.FOUND:
        assert len(result.name) <= 253
