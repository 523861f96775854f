"""Sans-IO body framing: where exactly one HTTP/1.1 body ends, so its bytes pass through as sent.

``BodyTracker.feed(data)`` returns how many leading bytes of ``data`` belong to the body; the
caller forwards those bytes untouched and keeps the rest (the next message, or a protocol
error if nothing may follow). Nothing is decoded or copied: a content-length body is a
countdown; a chunked body is scanned for its size lines, CRLFs and trailer fields (bounded),
and chunk data is skipped over by count. The chunk grammar is h11's (``tests/unit`` compares:
every body h11 refuses is refused here), stricter where a proxy forwarding the bytes must be:

- a chunk-size is 1 to 16 hex digits with a value below 2**63 (``bad_chunk_size``);
- chunk extensions follow RFC 9112 7.1.1: ``;`` name [``=`` token or quoted-string], with
  optional whitespace around ``=`` and before each further ``;`` but not between the size and
  the first ``;`` (h11 refuses that, and RFC 9112 calls it whitespace a sender must not
  send), nor before the CRLF (``5 \r\n``: h11 takes it, RFC 9112's grammar has no place for
  it, and a server behind us may read the size another way); no NUL or other control
  byte; the whole size line at most ``MAX_SIZE_LINE`` bytes (``bad_chunk_ext``);
- chunk data must be followed by CRLF (``bad_chunk_end``);
- trailer lines must end in CRLF and may not be folded (h11 also takes bare LF), each at most
  ``MAX_LINE`` bytes and ``MAX_TRAILERS`` in all (``bad_trailer``);
- a body the sender closes early is ``truncated_body`` (502).

Every line is checked by a pattern in which each repetition ends where the next must begin,
so the time is linear in the line (``tests/unit/test_linear_time``).
"""
from __future__ import annotations

import enum
import re

from edgemesh.proxy.http_head import FIELD_LINE, MAX_LENGTH, Framing, HeadError

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_EXT = rb"[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?"
_CHUNK_SIZE_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:;" + _EXT + rb"(?:[ \t]*;" + _EXT + rb")*)?\r\n")
_TRAILER_LINE = re.compile(FIELD_LINE.pattern + rb"\r\n")
MAX_SIZE_LINE = 1024  # a chunk-size line with its extensions
MAX_LINE = 4096  # one trailer field
MAX_TRAILERS = 16384


class _State(enum.Enum):
    SIZE = 1      # reading a chunk-size line
    DATA = 2      # inside chunk data, ``_left`` bytes to go
    DATA_END = 3  # expecting the CRLF after chunk data (``_left`` bytes of it to go)
    TRAILER = 4   # reading trailer lines up to the empty line
    DONE = 5


class BodyTracker:
    """Follows one body with the given framing; ``done`` once its last byte was fed."""

    __slots__ = ("framing", "_left", "_state", "_line", "_trailers")

    def __init__(self, framing: Framing, length: int = 0) -> None:
        self.framing = framing
        self._left = length
        self._line = bytearray()
        self._trailers = 0
        if framing is Framing.CHUNKED:
            self._state = _State.SIZE
        elif framing is Framing.LENGTH and length > 0:
            self._state = _State.DATA
        elif framing is Framing.CLOSE:
            self._state = _State.DATA
            self._left = -1
        else:
            self._state = _State.DONE

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    @property
    def until_close(self) -> bool:
        """The body ends only when the sender closes the connection."""
        return self.framing is Framing.CLOSE

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Consume body bytes from the start of ``data``; return how many belong to the body."""
        if self._state is _State.DONE:
            return 0
        if self.framing is not Framing.CHUNKED:
            if self._left < 0:
                return len(data)
            n = min(self._left, len(data))
            self._left -= n
            if self._left == 0:
                self._state = _State.DONE
            return n
        return self._feed_chunked(data)

    def eof(self) -> None:
        """The sender closed; raises ``HeadError`` unless that ends the body properly."""
        if self.framing is Framing.CLOSE:
            self._state = _State.DONE
        elif self._state is not _State.DONE:
            raise HeadError("connection closed in the middle of a body", 502, "truncated_body")

    def _feed_chunked(self, data: bytes | bytearray | memoryview) -> int:
        pos, size = 0, len(data)
        while pos < size and self._state is not _State.DONE:
            state = self._state
            if state is _State.DATA:
                n = min(self._left, size - pos)
                pos += n
                self._left -= n
                if self._left == 0:
                    self._state, self._left = _State.DATA_END, 2
            elif state is _State.DATA_END:
                pos = self._data_end(data, pos)
            else:
                pos = self._take_line(data, pos)
        return pos

    def _data_end(self, data: bytes | bytearray | memoryview, pos: int) -> int:
        expected = b"\r\n"[2 - self._left:]
        got = bytes(data[pos:pos + len(expected)])
        if got != expected[:len(got)]:
            raise HeadError("chunk data not followed by CRLF", cause="bad_chunk_end")
        self._left -= len(got)
        if self._left == 0:
            self._state = _State.SIZE
        return pos + len(got)

    def _take_line(self, data: bytes | bytearray | memoryview, pos: int) -> int:
        """Gather one line (size or trailer) up to LF; act on it once complete."""
        limit = MAX_SIZE_LINE if self._state is _State.SIZE else MAX_LINE
        piece = bytes(data[pos:pos + limit + 1 - len(self._line)])
        nl = piece.find(b"\n")
        if nl < 0:
            self._line += piece
            if len(self._line) > limit:
                self._line_too_long()
            return len(data)
        self._line += piece[:nl + 1]
        line, self._line = bytes(self._line), bytearray()
        if self._state is _State.SIZE:
            self._size_line(line)
        else:
            self._trailer_line(line)
        return pos + nl + 1

    def _line_too_long(self) -> None:
        if self._state is not _State.SIZE:
            raise HeadError("trailer line too long", cause="bad_trailer")
        if b";" in self._line:
            raise HeadError("chunk extensions too long", cause="bad_chunk_ext")
        raise HeadError("chunk-size line too long", cause="bad_chunk_size")

    def _size_line(self, line: bytes) -> None:
        m = _CHUNK_SIZE_LINE.fullmatch(line)
        if m is None:
            digits = len(line) - len(line.lstrip(b"0123456789abcdefABCDEF"))
            if 0 < digits <= 16 and line[digits:].lstrip(b" \t")[:1] == b";":
                raise HeadError("malformed chunk extension", cause="bad_chunk_ext")
            raise HeadError("malformed chunk-size line", cause="bad_chunk_size")
        self._left = int(m.group(1), 16)
        if self._left > MAX_LENGTH:
            raise HeadError("chunk-size of 2**63 or more", cause="bad_chunk_size")
        self._state = _State.DATA if self._left else _State.TRAILER

    def _trailer_line(self, line: bytes) -> None:
        if line == b"\r\n":
            self._state = _State.DONE
            return
        self._trailers += len(line)
        if self._trailers > MAX_TRAILERS or not _TRAILER_LINE.fullmatch(line):
            raise HeadError("malformed or oversized trailer fields", cause="bad_trailer")
