"""Body framing, sans-IO: the chunked scanner against h11's ChunkedReader, content-length,
close-delimited bodies, and that bytes pass through untouched however they are split."""
from __future__ import annotations

import re

import h11
import pytest
from h11._readers import ChunkedReader
from h11._receivebuffer import ReceiveBuffer
from h11._util import LocalProtocolError
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemesh.proxy.http_body import MAX_LINE, BodyTracker
from edgemesh.proxy.http_head import CAUSES, Framing, HeadError


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    out = b""
    for data in draw(st.lists(st.binary(min_size=1, max_size=40), max_size=5)):
        size = draw(st.sampled_from(["%x", "%X", "%04x"])) % len(data)
        ext = draw(st.sampled_from([b"", b";a=b", b";x", b"; q=\"1\""]))
        out += size.encode() + ext + b"\r\n" + data + b"\r\n"
    out += b"0\r\n"
    for name, value in draw(st.lists(st.tuples(st.sampled_from([b"Expires", b"X-T"]),
                                               st.sampled_from([b"1", b"a b"])), max_size=2)):
        out += name + b": " + value + b"\r\n"
    return out + b"\r\n"


def feed_split(tracker: BodyTracker, data: bytes, cuts: list[int]) -> int:
    """Feed ``data`` in pieces cut at ``cuts``; total bytes the tracker took."""
    taken, start = 0, 0
    for end in sorted({c % (len(data) + 1) for c in cuts} | {len(data)}):
        piece = data[start:end]
        n = tracker.feed(piece)
        taken += n
        if n < len(piece):
            break
        start = end
    return taken


def h11_consumed(data: bytes) -> int | None:
    """How many bytes h11's chunked reader takes for one body (None: it wants more)."""
    buf = ReceiveBuffer()
    buf += data
    reader = ChunkedReader()
    while True:
        event = reader(buf)
        if event is None:
            return None
        if type(event) is h11.EndOfMessage:
            return len(data) - len(buf)


@given(chunked_bodies(), st.binary(max_size=20), st.lists(st.integers(0, 400), max_size=6))
@settings(max_examples=300)
def test_chunked_body_ends_where_h11_says(body: bytes, after: bytes, cuts: list[int]) -> None:
    data = body + after
    tracker = BodyTracker(Framing.CHUNKED)
    assert feed_split(tracker, data, cuts) == len(body) == h11_consumed(data)
    assert tracker.done


_EXT_RFC = re.compile(  # RFC 9112 7.1.1, written apart from the module's pattern
    rb'(?:[ \t]*;[ \t]*[A-Za-z0-9!#$%&\'*+.^_`|~-]+(?:[ \t]*=[ \t]*(?:[A-Za-z0-9!#$%&\'*+.^_`|~-]+'
    rb'|"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f])*"))?)*')


def refused_on_purpose(data: bytes, cause: str) -> bool:
    """What h11 takes and this refuses (module docstring), judged from the bytes."""
    if cause == "bad_trailer":  # a trailer line ending in a bare LF, or folded
        trailers = data[data.find(b"0\r\n"):]
        return b"0\r\n" in data and (b"\n" in trailers.replace(b"\r\n", b"") or
                                     b"\n " in trailers or b"\n\t" in trailers)
    if cause == "bad_chunk_size":  # more than 16 hex digits, or blanks before the CRLF
        return any(len(m) > 16 for m in re.findall(rb"(?:^|\n)([0-9A-Fa-f]+)", data)) or \
            re.search(rb"(?:^|\n)[0-9A-Fa-f]+[ \t]+\r\n", data) is not None
    if cause == "bad_chunk_ext":  # outside RFC 9112 7.1.1, which has no blanks before CRLF
        return any(not _EXT_RFC.fullmatch(ext) for ext in
                   re.findall(rb"(?:^|\n)[0-9A-Fa-f]+(;[^\n]*)\r\n", data))
    return False


@given(chunked_bodies(), st.data())
@settings(max_examples=500)
def test_mutated_chunked_bodies_h11_rejects_we_reject(body: bytes, draw: st.DataObject) -> None:
    for _ in range(draw.draw(st.integers(1, 2))):
        i = draw.draw(st.integers(0, len(body) - 1))
        body = body[:i] + draw.draw(st.sampled_from(
            [b"", b"\n", b"g", b" ", b"\r", b";", b"0", b"\x00", b"\x01", b"=", b'"', b"\\",
             b"\t"])) + body[i + 1:]
    data = body
    try:
        ref = h11_consumed(data)
    except LocalProtocolError:
        ref = -1
    tracker = BodyTracker(Framing.CHUNKED)
    cause = ""
    try:
        ours = tracker.feed(data)
        ours = ours if tracker.done else None
    except HeadError as e:
        ours, cause = -1, e.cause
        assert cause in CAUSES
    if ref == -1 or ref is None:
        assert ours in (-1, None)  # we may refuse a line h11 would refuse a few bytes later
    elif ours != ref:
        assert ours == -1 and refused_on_purpose(data, cause), (data, cause)


@pytest.mark.parametrize("data,cause", [
    (b"1" + b"0" * 16 + b"\r\n", "bad_chunk_size"),  # 17 hex digits
    (b"0" * 17 + b"5\r\n", "bad_chunk_size"),
    (b"8000000000000000\r\n", "bad_chunk_size"),  # 2**63
    (b"ffffffffffffffff\r\n", "bad_chunk_size"),
    (b"\r\n", "bad_chunk_size"),
    (b"-5\r\n", "bad_chunk_size"),
    (b"0x5\r\n", "bad_chunk_size"),
    (b"5\n", "bad_chunk_size"),
    (b"5\x00\r\n", "bad_chunk_size"),
    (b"5;a\x00=b\r\n", "bad_chunk_ext"),
    (b"5;a=\x00\r\n", "bad_chunk_ext"),
    (b'5;a="\x00"\r\n', "bad_chunk_ext"),
    (b'5;a="\x01"\r\n', "bad_chunk_ext"),
    (b"5;a=b\x7f\r\n", "bad_chunk_ext"),
    (b"5;a=b\rc\r\n", "bad_chunk_ext"),
    (b"5;\r\n", "bad_chunk_ext"),
    (b"5;=b\r\n", "bad_chunk_ext"),
    (b"5;a=\r\n", "bad_chunk_ext"),
    (b'5;a="b\r\n', "bad_chunk_ext"),
    (b"5;a=b c\r\n", "bad_chunk_ext"),
    (b"5 ;a\r\n", "bad_chunk_ext"),  # h11 refuses whitespace before the first ";"
    (b"5 \r\n", "bad_chunk_size"),  # h11 takes blanks before the CRLF; RFC 9112 has none
    (b"5\t\r\n", "bad_chunk_size"),
    (b"5;a=b \r\n", "bad_chunk_ext"),
    (b"5;a=" + b"b" * 1100 + b"\r\n", "bad_chunk_ext"),  # longer than MAX_SIZE_LINE
    (b"5;a=" + b"b" * 1100, "bad_chunk_ext"),  # ... also before its line end arrives
    (b"5" * 1100, "bad_chunk_size"),
    (b"2\r\nabXY", "bad_chunk_end"),
    (b"0\r\nX: a\x00b\r\n\r\n", "bad_trailer"),
    (b"0\r\nX : a\r\n\r\n", "bad_trailer"),
    (b"0\r\nX: a\n\r\n", "bad_trailer"),
    (b"0\r\n folded\r\n\r\n", "bad_trailer"),
    (b"0\r\nX: " + b"a" * MAX_LINE, "bad_trailer"),
])
def test_bad_chunk_lines_are_refused_by_cause(data: bytes, cause: str) -> None:
    with pytest.raises(HeadError) as e:
        BodyTracker(Framing.CHUNKED).feed(data)
    assert (e.value.status, e.value.cause) == (400, cause)


@pytest.mark.parametrize("line", [
    b"5\r\n", b"7fffffffffffffff\r\n", b"0000000000000005\r\n", b"5;x\r\n",
    b'5;a=b;c="d\\"e" ; f = g\r\n', b'5;a="\t q\x80\xff";b\r\n', b"5;a" + b"b" * 900 + b"\r\n",
])
def test_chunk_size_lines_in_the_grammar_pass(line: bytes) -> None:
    t = BodyTracker(Framing.CHUNKED)
    assert t.feed(line) == len(line) and not t.done
    assert h11_consumed(line) is None  # h11 reads the line too, and waits for the data


def test_a_truncated_body_is_the_senders_fault() -> None:
    t = BodyTracker(Framing.CHUNKED)
    t.feed(b"5\r\nab")
    with pytest.raises(HeadError) as e:
        t.eof()
    assert (e.value.status, e.value.cause) == (502, "truncated_body")


def test_content_length_countdown_and_leftover() -> None:
    t = BodyTracker(Framing.LENGTH, 5)
    assert t.feed(b"ab") == 2 and not t.done
    assert t.feed(b"cdeGET /") == 3 and t.done
    assert t.feed(b"more") == 0


def test_no_body_and_close_delimited() -> None:
    assert BodyTracker(Framing.NONE).done
    assert BodyTracker(Framing.LENGTH, 0).done
    t = BodyTracker(Framing.CLOSE)
    assert t.feed(b"x" * 100000) == 100000 and not t.done and t.until_close
    t.eof()
    assert t.done


def test_early_close_is_an_error_except_for_close_delimited() -> None:
    t = BodyTracker(Framing.LENGTH, 5)
    t.feed(b"ab")
    with pytest.raises(HeadError):
        t.eof()


def test_overlong_size_line_and_bad_chunk_end_are_refused() -> None:
    with pytest.raises(HeadError):
        BodyTracker(Framing.CHUNKED).feed(b"5;" + b"x" * MAX_LINE)
    with pytest.raises(HeadError):
        BodyTracker(Framing.CHUNKED).feed(b"2\r\nabXY")
    with pytest.raises(HeadError):
        BodyTracker(Framing.CHUNKED).feed(b"zz\r\n")


def test_large_chunks_are_skipped_by_count() -> None:
    t = BodyTracker(Framing.CHUNKED)
    assert t.feed(b"100000\r\n") == 8
    assert t.feed(memoryview(b"x" * 0x100000)) == 0x100000
    assert t.feed(b"\r\n0\r\n\r\nNEXT") == 7 and t.done
