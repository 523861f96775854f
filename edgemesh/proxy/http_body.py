"""Sans-IO body framing: where exactly one HTTP/1.1 body ends, so its bytes pass through as sent.

``BodyTracker.feed(data)`` returns how many leading bytes of ``data`` belong to the body; the
caller forwards those bytes untouched and keeps the rest (the next message, or a protocol
error if nothing may follow). Nothing is decoded or copied: a content-length body is a
countdown; a chunked body is scanned for its size lines, CRLFs and trailer fields (bounded),
and chunk data is skipped over by count. The chunk grammar is h11's (``tests/unit`` compares),
except that trailer lines must end in CRLF and may not be folded (h11 also takes bare LF).
"""
from __future__ import annotations

import enum
import re

from edgemesh.proxy.http_head import _FIELD, Framing, HeadError

_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\n]*)?[ \t]*\r\n")
_TRAILER_LINE = re.compile(_FIELD + rb"\r\n")
MAX_LINE = 4096  # a chunk-size line with extensions, or one trailer field
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
            raise HeadError("connection closed in the middle of a body", 502)

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
            raise HeadError("chunk data not followed by CRLF")
        self._left -= len(got)
        if self._left == 0:
            self._state = _State.SIZE
        return pos + len(got)

    def _take_line(self, data: bytes | bytearray | memoryview, pos: int) -> int:
        """Gather one line (size or trailer) up to LF; act on it once complete."""
        view = data[pos:]
        nl = bytes(view[:MAX_LINE + 1 - len(self._line)]).find(b"\n")
        if nl < 0:
            self._line += view[:MAX_LINE + 1 - len(self._line)]
            if len(self._line) > MAX_LINE:
                raise HeadError("chunk-size or trailer line too long")
            return len(data)
        self._line += view[:nl + 1]
        line, self._line = bytes(self._line), bytearray()
        if self._state is _State.SIZE:
            self._size_line(line)
        else:
            self._trailer_line(line)
        return pos + nl + 1

    def _size_line(self, line: bytes) -> None:
        m = _CHUNK_SIZE_LINE.fullmatch(line)
        if m is None:
            raise HeadError("malformed chunk-size line")
        self._left = int(m.group(1), 16)
        self._state = _State.DATA if self._left else _State.TRAILER

    def _trailer_line(self, line: bytes) -> None:
        if line == b"\r\n":
            self._state = _State.DONE
            return
        self._trailers += len(line)
        if self._trailers > MAX_TRAILERS or not _TRAILER_LINE.fullmatch(line):
            raise HeadError("malformed or oversized trailer fields")
