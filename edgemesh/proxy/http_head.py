"""Sans-IO HTTP/1.1 message heads: the fast path the per-request proxy parses on every request.

The proxy parses only what routing and framing need and passes every byte through untouched,
so it must never read a head differently from the endpoint behind it (request smuggling). The
grammar is h11's (RFC 9112 as h11 reads it), checked by one compiled regular expression over the
whole head; h11 itself is the reference the tests compare against (``tests/unit/test_http_head``):
every head h11 rejects, this rejects too, and on heads both accept they agree on method, target,
version, headers and framing. Deliberately stricter than h11 on *requests*, because the bytes
go on to a server that may read them another way:

- line endings must be CRLF (h11 also takes a bare LF);
- obsolete line folding (a header line starting with a space) is refused;
- ``Transfer-Encoding`` together with ``Content-Length`` is refused (RFC 9112 6.1 allows this);
- ``CONNECT`` is refused (a service proxy is not a forward proxy).

Responses are read as leniently as h11 reads them (bare LF, missing reason phrase), since a
lenient reading of a response cannot smuggle anything.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import NamedTuple

from edgemesh.errors import RemoteProtocolError

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_VALUE = rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?"  # h11's field-value, OWS stripped
_FIELD = rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")[ \t]*"

_REQUEST_HEAD = re.compile(
    rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])\r\n"
    rb"((?:" + _TOKEN + rb":[ \t]*" + _VALUE + rb"[ \t]*\r\n)*)\r\n")
_REQUEST_FIELD = re.compile(_FIELD + rb"\r\n")

_RESPONSE_HEAD = re.compile(
    rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ((?:[ \t]|[^\x00\s])*))?\r?\n"
    rb"((?:" + _TOKEN + rb":[ \t]*" + _VALUE + rb"[ \t]*\r?\n"
    rb"(?:[ \t]+" + _VALUE + rb"[ \t]*\r?\n)*)*)\r?\n")
_RESPONSE_FIELD = re.compile(_FIELD + rb"\r?\n")
_FIELD_LINE = re.compile(_FIELD)
_FOLDED = re.compile(rb"\n[ \t]")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_DIGITS = re.compile(rb"[0-9]{1,20}")

Headers = tuple[tuple[bytes, bytes], ...]  # (name as sent, value with OWS stripped)


class Framing(enum.Enum):
    """How the body after a head ends."""
    NONE = "none"        # no body at all
    LENGTH = "length"    # exactly ``length`` bytes
    CHUNKED = "chunked"  # chunked transfer coding, ends with the last chunk and trailers
    CLOSE = "close"      # a response body that ends when the server closes


class HeadError(RemoteProtocolError):
    """A malformed or oversized message; ``hint`` is the status to answer a client with.

    ``cause`` is a short snake_case slug naming what was wrong (``bad_chunk_size``,
    ``te_on_http10``, ...): the label metrics count rejections by, so it must stay a small
    fixed set, never text taken from the message.
    """

    def __init__(self, message: str, hint: int = 400, cause: str = "malformed") -> None:
        super().__init__(message, hint)
        self.status = hint
        self.cause = cause


@dataclass(frozen=True)
class HeadLimits:
    """Bounds on one head, as servers commonly set them (haproxy: 16 KiB, 101 fields)."""
    max_size: int = 16384
    max_fields: int = 100


class RequestHead(NamedTuple):
    """A parsed request head (a named tuple: immutable, and cheap to build on every request)."""
    method: bytes
    target: bytes
    version: bytes  # b"1.1" or b"1.0"
    headers: Headers
    framing: Framing
    length: int  # body bytes with Framing.LENGTH, else 0
    keep_alive: bool  # the client will send another request on this connection
    upgrade: bytes  # lowercased protocol asked for with Connection: upgrade, e.g. b"websocket"
    expect_continue: bool
    host: bytes

    def header(self, name: bytes) -> bytes | None:
        """The first value of the field ``name`` (lowercase), or None."""
        return header_value(self.headers, name)


class ResponseHead(NamedTuple):
    """A parsed response head."""
    version: bytes
    status: int
    reason: bytes
    headers: Headers
    framing: Framing
    length: int
    keep_alive: bool  # the server keeps the connection open after this response


def header_value(headers: Headers, name: bytes) -> bytes | None:
    """The first value of ``name`` (lowercase) in ``headers``, or None."""
    for n, v in headers:
        if len(n) == len(name) and n.lower() == name:
            return v
    return None


def head_end(buf: bytes | bytearray, limits: HeadLimits, *, request: bool = True) -> int:
    """Index just past the blank line ending the head at the start of ``buf``; -1: need more.

    Raises ``HeadError`` (431) when no head ends within the size limit, and (400) when the
    first byte cannot start a request line, so a client cannot make us buffer garbage.
    """
    limit = limits.max_size
    if request:
        if buf and buf[0] < 0x21:
            raise HeadError("request line starts with a control character or blank")
        end = buf.find(b"\r\n\r\n", 0, limit)
        if end >= 0:
            return end + 4
        if _BARE_LF.search(buf, 0, limit):
            raise HeadError("request head with a bare LF line ending")
    else:
        ends = [i + n for i, n in ((buf.find(b"\n\n", 0, limit), 2),
                                   (buf.find(b"\n\r\n", 0, limit), 3)) if i >= 0]
        if ends:
            return min(ends)
    if len(buf) >= limit:
        raise HeadError(f"head larger than {limit} bytes", 431 if request else 502)
    return -1


def _comma_tokens(value: bytes) -> list[bytes]:
    return [t for t in (p.strip().lower() for p in value.split(b",")) if t]


def _content_length(value: bytes, seen: bytes | None) -> bytes:
    lengths = {p.strip() for p in value.split(b",")}
    if len(lengths) != 1:
        raise HeadError("conflicting Content-Length values")
    length = lengths.pop()
    if not _DIGITS.fullmatch(length) or (seen is not None and seen != length):
        raise HeadError("bad or conflicting Content-Length")
    return length


@dataclass(slots=True)
class _Fields:
    """What the framing fields of one head say."""
    length: bytes | None = None
    chunked: bool = False
    connection: tuple[bytes, ...] = ()
    upgrade: bytes = b""
    expect: bytes = b""
    hosts: int = 0
    host: bytes = b""


_FRAMING_INITIALS = frozenset(b"CcTtUuEeHh")  # content-length, transfer-encoding, connection,
# upgrade, expect, host: other fields are skipped without lowering their names


def _scan_fields(headers: Headers) -> _Fields:
    f = _Fields()
    initials = _FRAMING_INITIALS
    for name, value in headers:
        if name[0] not in initials:
            continue
        n = name.lower()
        if n == b"content-length":
            f.length = _content_length(value, f.length)
        elif n == b"transfer-encoding":
            if f.chunked:
                raise HeadError("more than one Transfer-Encoding field", 501)
            if value.lower() != b"chunked":
                raise HeadError("only Transfer-Encoding: chunked is supported", 501)
            f.chunked = True
        elif n == b"connection":
            f.connection += tuple(_comma_tokens(value))
        elif n == b"upgrade":
            f.upgrade = value.lower()
        elif n == b"expect":
            f.expect = value.lower()
        elif n == b"host":
            f.hosts += 1
            f.host = value
    return f


def _keep_alive(version: bytes, connection: tuple[bytes, ...]) -> bool:
    if b"close" in connection:
        return False
    return version == b"1.1" or b"keep-alive" in connection


def parse_request_head(data: bytes, limits: HeadLimits = HeadLimits()) -> RequestHead:
    """Parse one complete request head (``data`` ends with the blank line)."""
    if len(data) > limits.max_size:
        raise HeadError(f"head larger than {limits.max_size} bytes", 431)
    m = _REQUEST_HEAD.fullmatch(data)
    if m is None:
        raise HeadError("malformed request head")
    method, target, version, block = m.groups()
    headers: Headers = tuple(_REQUEST_FIELD.findall(block))
    if len(headers) > limits.max_fields:
        raise HeadError(f"more than {limits.max_fields} header fields", 431)
    f = _scan_fields(headers)
    if f.hosts > 1 or (f.hosts == 0 and version == b"1.1"):
        raise HeadError("a request needs exactly one Host field")
    if f.chunked and f.length is not None:
        raise HeadError("both Transfer-Encoding and Content-Length")
    if method == b"CONNECT":
        raise HeadError("CONNECT is not supported by a service proxy", 405)
    length = int(f.length) if f.length is not None else 0
    framing = Framing.CHUNKED if f.chunked else Framing.LENGTH if length else Framing.NONE
    upgrade = f.upgrade if b"upgrade" in f.connection else b""
    return RequestHead(method=method, target=target, version=version, headers=headers,
                       framing=framing, length=length,
                       keep_alive=_keep_alive(version, f.connection), upgrade=upgrade,
                       expect_continue=f.expect == b"100-continue" and version == b"1.1",
                       host=f.host)


def parse_response_head(data: bytes, request_method: bytes,
                        limits: HeadLimits = HeadLimits()) -> ResponseHead:
    """Parse one complete response head to a request with ``request_method``."""
    if len(data) > limits.max_size:
        raise HeadError(f"response head larger than {limits.max_size} bytes", 502)
    m = _RESPONSE_HEAD.fullmatch(data)
    if m is None:
        raise HeadError("malformed response head", 502)
    version, status_text, reason, block = m.groups()
    headers = _folded_fields(block) if _FOLDED.search(block) else \
        tuple(_RESPONSE_FIELD.findall(block))
    if len(headers) > limits.max_fields:
        raise HeadError(f"more than {limits.max_fields} response header fields", 502)
    return _response(version, status_text, reason, headers, request_method)


_RESPONSE_FRAMING_NAMES = (b"\ncontent-length:", b"\ntransfer-encoding:", b"\nconnection:")


def parse_response_framing(data: bytes, request_method: bytes,
                           limits: HeadLimits = HeadLimits()) -> ResponseHead:
    """``parse_response_head`` for a proxy that relays the head as it is: the same checks and
    framing, but ``headers`` holds only the framing fields (Content-Length, Transfer-Encoding,
    Connection), found by searching instead of splitting every field. Folded or numerous
    fields take the full parse."""
    m = _RESPONSE_HEAD.fullmatch(data) if len(data) <= limits.max_size else None
    if m is None:
        return parse_response_head(data, request_method, limits)
    version, status_text, reason, block = m.groups()
    if block.count(b"\n") > limits.max_fields or _FOLDED.search(block):
        return parse_response_head(data, request_method, limits)
    low = b"\n" + block.lower()
    found = []
    for name in _RESPONSE_FRAMING_NAMES:
        pos = low.find(name)
        while pos >= 0:
            line = block[pos:block.index(b"\n", pos)].rstrip(b"\r")  # ``low`` is one longer
            field = _FIELD_LINE.fullmatch(line)
            if field is None:
                return parse_response_head(data, request_method, limits)
            found.append((field.group(1), field.group(2)))
            pos = low.find(name, pos + 1)
    return _response(version, status_text, reason, tuple(found), request_method)


def _response(version: bytes, status_text: bytes, reason: bytes | None, headers: Headers,
              request_method: bytes) -> ResponseHead:
    try:
        f = _scan_fields(headers)
    except HeadError as e:
        raise HeadError(str(e), 502) from None
    status = int(status_text)
    keep_alive = _keep_alive(version, f.connection)
    if status < 200 or status in (204, 304) or request_method == b"HEAD":
        framing, length = Framing.NONE, 0
    elif f.chunked:
        framing, length = Framing.CHUNKED, 0
    elif f.length is not None:
        length = int(f.length)
        framing = Framing.LENGTH if length else Framing.NONE
    else:
        framing, length, keep_alive = Framing.CLOSE, 0, False
    return ResponseHead(version=version, status=status, reason=reason or b"", headers=headers,
                        framing=framing, length=length, keep_alive=keep_alive)


def _folded_fields(block: bytes) -> Headers:
    """Fields of a response head with obsolete line folding, joined exactly as h11 joins them."""
    lines: list[bytes] = []
    for line in block.split(b"\n")[:-1]:
        line = line[:-1] if line.endswith(b"\r") else line
        stripped = line.lstrip(b" \t")
        if len(stripped) != len(line):
            if not lines:
                raise HeadError("continuation line at the start of the fields", 502)
            lines[-1] += b" " + stripped
        else:
            lines.append(line)
    out = []
    for line in lines:
        m = _FIELD_LINE.fullmatch(line)
        if m is None:
            raise HeadError("malformed folded response field", 502)
        out.append((m.group(1), m.group(2)))
    return tuple(out)
