"""Sans-IO HTTP/1.1 message heads: the fast path the per-request proxy parses on every request.

The proxy parses only what routing and framing need and passes every byte through untouched,
so it must never read a head differently from the endpoint behind it (request smuggling). The
grammar is h11's (RFC 9112 as h11 reads it); h11 itself is the reference the tests compare
against (``tests/unit/test_http_head``): every head h11 rejects, this rejects too, and on heads
both accept they agree on method, target, version, headers and framing.

Linear time, whatever the bytes: a head is checked by one compiled pattern in which every
repetition ends where the next one must begin (a field line is a token, ``:``, then any bytes
but NUL, CR, LF, VT and FF up to its line end), so no byte can be matched two ways and a
failing match backtracks at most once over each byte; optional whitespace is stripped from a
value by a pattern of the same kind. ``tests/unit/test_linear_time`` holds each parser to
this with inputs of growing size (the old single pattern took seconds on 300 bytes).

Deliberately stricter than h11 on *requests*, because the bytes go on to a server that may
read them another way (RFC 9112 asks this of an intermediary); each refusal names a
``HeadError.cause``:

- line endings must be CRLF (h11 also takes a bare LF); obsolete line folding is refused
  (``malformed``);
- only ``HTTP/1.0`` and ``HTTP/1.1``: any other ``HTTP/x.y`` is 505 (``version``);
- the request-target is origin-form (``/path?query``) or absolute-form (``http://`` or
  ``https://``, any case, then a valid authority and an optional path or query); never
  authority-form, asterisk-form (``*``, even for OPTIONS: a service proxy answers for its
  services, not for itself), nor a relative path; it may not hold ``#`` or ``\\`` (which some
  servers read as ``/``), and ``%`` in its path must start a ``%HH`` escape (``bad_target``).
  Targets are not normalised here (routing does that);
- ``Host``: exactly one on HTTP/1.1, at most one on HTTP/1.0, and its value an RFC 3986
  authority: a reg-name, IPv4 address or ``[IPv6]`` literal with an optional ``:port`` of 1-5
  digits up to 65535; no userinfo, no empty host (``bad_host``). RFC 9112 3.2 allows an empty
  Host only when the target URI has no authority, which never holds for the ``http``/``https``
  URIs a service proxy serves (RFC 9110 4.2.1: an empty host must be rejected);
- ``Content-Length`` is 1 to 19 digits with a value below 2**63; a list (``5, 5``) or a
  repeated field is refused even when the values agree: RFC 9110 8.6 allows merging identical
  values only by *replacing* them with one field, and this proxy forwards heads unchanged, so
  the endpoint would still see the list (``bad_content_length``);
- ``Transfer-Encoding`` on an HTTP/1.0 message (RFC 9112 6.1: faulty framing,
  ``te_on_http10``), together with ``Content-Length`` (RFC 9112 6.1 allows this,
  ``te_and_cl``), or other than one ``chunked`` (501, ``bad_transfer_encoding``);
- ``CONNECT`` is refused (405, ``connect``: a service proxy is not a forward proxy).

Responses are read as leniently as h11 reads them (bare LF, missing reason phrase, obsolete
folding), since a lenient reading of a response cannot smuggle anything, but with the same
bounds on framing (502): a status outside 100-599 (``bad_status``), and the Content-Length
and Transfer-Encoding rules above.

``HeadError.cause`` is one of ``CAUSES`` (chunked bodies add theirs, see ``http_body``):
``malformed`` (a line that does not parse), ``too_large`` (size or field count), ``version``,
``bad_target``, ``bad_host``, ``bad_content_length``, ``bad_transfer_encoding``,
``te_on_http10``, ``te_and_cl``, ``connect``, ``bad_status``.
"""
from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass
from typing import NamedTuple

from edgemesh.errors import RemoteProtocolError

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
# Any byte a field line may hold after the colon: h11's field-vchar, SP and HTAB.
_LINE = rb"[^\x00\r\n\x0b\x0c]*"
# Name and value of one valid field line, OWS stripped: the value starts and ends with a
# field-vchar, so it cannot share a byte with the whitespace around it.
_FIELD = rb"(" + _TOKEN + rb"):[ \t]*(?:([^\x00\s](?:[^\r\n]*[^\x00\s])?)[ \t]*)?"
FIELD_LINE = re.compile(rb"(?:" + _TOKEN + rb"):" + _LINE)  # one field line, no line end

# A request-target's path (after its first "/") and query: printable ASCII without "#" or
# "\\"; a "%" in the path must start a %HH escape (checked apart, only when there is one).
_PATH = rb"[\x21\x22\x24-\x3e\x40-\x5b\x5d-\x7e]*(?:\?[\x21\x22\x24-\x5b\x5d-\x7e]*)?"
_ORIGIN = rb"/" + _PATH
_ORIGIN_FORM = re.compile(_ORIGIN)
_ABSOLUTE_FORM = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?#]*)(?:" + _ORIGIN + rb"|\?"
                            rb"[\x21\x22\x24-\x5b\x5d-\x7e]*)?")
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_PORT = (rb"(?::(?:[0-9]{1,4}|[0-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]"
         rb"|6553[0-5]))?")  # 1-5 digits, at most 65535
_AUTHORITY = re.compile(  # reg-name or IPv4 (checked as a reg-name), or an IPv6 literal
    rb"(?:[-A-Za-z0-9._~!$&'()*+,;=%]+|\[([0-9A-Fa-f:.]{2,45})\])" + _PORT)

# The request-target is group 2 when it is a valid origin-form (the case worth making fast),
# else group 3, for ``_check_target`` to judge.
_REQUEST_HEAD = re.compile(
    rb"(" + _TOKEN + rb") (?:(" + _ORIGIN + rb")|([\x21-\x7e]+)) HTTP/([0-9]\.[0-9])\r\n"
    rb"((?:" + _TOKEN + rb":" + _LINE + rb"\r\n)*)\r\n")
_REQUEST_FIELD = re.compile(_FIELD + rb"\r\n")

_RESPONSE_HEAD = re.compile(
    rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: (" + _LINE + rb"))?\r?\n"
    rb"((?:" + _TOKEN + rb":" + _LINE + rb"\r?\n(?:[ \t]" + _LINE + rb"\r?\n)*)*)\r?\n")
_RESPONSE_FIELD = re.compile(_FIELD + rb"\r?\n")
_FIELD_NAME_VALUE = re.compile(_FIELD)
_FOLDED = re.compile(rb"\n[ \t]")
MAX_LENGTH = 2**63 - 1  # Content-Length and chunk sizes must fit in a signed 64-bit integer

CAUSES = frozenset({
    "malformed", "too_large", "version", "bad_target", "bad_host", "bad_content_length",
    "bad_transfer_encoding", "te_on_http10", "te_and_cl", "connect", "bad_status",
    # http_body's, for chunked bodies
    "bad_chunk_size", "bad_chunk_ext", "bad_chunk_end", "bad_trailer", "truncated_body",
})

Headers = tuple[tuple[bytes, bytes], ...]  # (name as sent, value with OWS stripped)


class Framing(enum.Enum):
    """How the body after a head ends."""
    NONE = "none"        # no body at all
    LENGTH = "length"    # exactly ``length`` bytes
    CHUNKED = "chunked"  # chunked transfer coding, ends with the last chunk and trailers
    CLOSE = "close"      # a response body that ends when the server closes


class HeadError(RemoteProtocolError):
    """A malformed or oversized message; ``hint`` is the status to answer a client with.

    ``cause`` is a short snake_case slug naming what was wrong, one of ``CAUSES``
    (``bad_chunk_size``, ``te_on_http10``, ...): the label metrics count rejections by, so it
    is a small fixed set, never text taken from the message. Messages are fixed text too, so
    a log deduplicated by message cannot be flooded.
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


def head_end(buf: bytes | bytearray, limits: HeadLimits, *, request: bool = True,
             start: int = 0) -> int:
    """Index just past the blank line ending the head at the start of ``buf``; -1: need more.

    Raises ``HeadError`` (431) when no head ends within the size limit, and (400) when the
    first byte cannot start a request line, so a client cannot make us buffer garbage.
    ``start``: bytes before it were searched by an earlier call on the same growing buffer
    (pass that call's ``len(buf)``), so a head arriving in many small pieces is scanned once
    rather than once per piece.
    """
    limit = limits.max_size
    if request:
        if buf and buf[0] < 0x21:
            raise HeadError("request line starts with a control character or blank")
        end = buf.find(b"\r\n\r\n", max(0, start - 3), limit)
        if end >= 0:
            return end + 4
        if buf.count(b"\n", start, limit) != buf.count(b"\r\n", max(0, start - 1), limit):
            raise HeadError("request head with a bare LF line ending")
    else:
        ends = [i + n for i, n in ((buf.find(b"\n\n", max(0, start - 1), limit), 2),
                                   (buf.find(b"\n\r\n", max(0, start - 2), limit), 3)) if i >= 0]
        if ends:
            return min(ends)
    if len(buf) >= limit:
        raise HeadError(f"head larger than {limit} bytes", 431 if request else 502,
                        "too_large")
    return -1


# ---- framing fields ---------------------------------------------------------------------------

def _comma_tokens(value: bytes) -> list[bytes]:
    return [t for t in (p.strip().lower() for p in value.split(b",")) if t]


def _content_length(value: bytes, seen: bytes | None) -> bytes:
    if seen is not None:
        raise HeadError("more than one Content-Length field", cause="bad_content_length")
    if not value.isdigit() or len(value) > 19 or int(value) > MAX_LENGTH:
        raise HeadError("Content-Length is not one decimal number below 2**63",
                        cause="bad_content_length")
    return value


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
                raise HeadError("more than one Transfer-Encoding field", 501,
                                "bad_transfer_encoding")
            if value.lower() != b"chunked":
                raise HeadError("only Transfer-Encoding: chunked is supported", 501,
                                "bad_transfer_encoding")
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


# ---- targets and authorities ------------------------------------------------------------------

def valid_authority(authority: bytes) -> bool:
    """Whether ``authority`` is an RFC 3986 host (reg-name, IPv4 or ``[IPv6]``) with an
    optional ``:port`` of 1-5 digits up to 65535, and neither userinfo nor an empty host."""
    m = _AUTHORITY.fullmatch(authority)
    if m is None or (b"%" in authority and _BAD_PERCENT.search(authority)):
        return False
    return m.group(1) is None or _valid_ipv6(m.group(1))


def _valid_ipv6(literal: bytes) -> bool:
    try:
        ipaddress.IPv6Address(literal.decode("ascii"))
    except ValueError:
        return False
    return True


def _check_target(target: bytes) -> None:
    """Refuse a request-target that is neither origin-form nor absolute-form with a valid
    authority, or whose path holds a bad %-escape (see the module docstring)."""
    m = _ABSOLUTE_FORM.fullmatch(target) if target[0] != 0x2f else None
    if m is None and not _ORIGIN_FORM.fullmatch(target):
        raise HeadError("request-target is not origin-form or absolute-form, or holds '#' or "
                        "'\\'", cause="bad_target")
    if m is not None and not valid_authority(m.group(1)):
        raise HeadError("absolute-form target without a valid authority", cause="bad_target")
    if b"%" in target and _BAD_PERCENT.search(target.partition(b"?")[0]):
        raise HeadError("'%' not followed by two hex digits in the request-target's path",
                        cause="bad_target")


# ---- requests ---------------------------------------------------------------------------------

def parse_request_head(data: bytes, limits: HeadLimits = HeadLimits()) -> RequestHead:
    """Parse one complete request head (``data`` ends with the blank line)."""
    if len(data) > limits.max_size:
        raise HeadError(f"head larger than {limits.max_size} bytes", 431, "too_large")
    m = _REQUEST_HEAD.fullmatch(data)
    if m is None:
        raise HeadError("malformed request head")
    method, target, other_target, version, block = m.groups()
    if version != b"1.1" and version != b"1.0":
        raise HeadError("only HTTP/1.0 and HTTP/1.1 are supported", 505, "version")
    headers: Headers = tuple(_REQUEST_FIELD.findall(block))
    if len(headers) > limits.max_fields:
        raise HeadError(f"more than {limits.max_fields} header fields", 431, "too_large")
    f = _scan_fields(headers)
    if method == b"CONNECT":
        raise HeadError("CONNECT is not supported by a service proxy", 405, "connect")
    if target is None or b"%" in target:
        target = target or other_target
        _check_target(target)
    if f.hosts > 1 or (f.hosts == 0 and version == b"1.1"):
        raise HeadError("a request needs exactly one Host field", cause="bad_host")
    if f.hosts and not valid_authority(f.host):
        raise HeadError("Host is not a valid authority", cause="bad_host")
    if f.chunked:
        if version == b"1.0":
            raise HeadError("Transfer-Encoding in an HTTP/1.0 request", cause="te_on_http10")
        if f.length is not None:
            raise HeadError("both Transfer-Encoding and Content-Length", cause="te_and_cl")
    length = int(f.length) if f.length is not None else 0
    framing = Framing.CHUNKED if f.chunked else Framing.LENGTH if length else Framing.NONE
    upgrade = f.upgrade if b"upgrade" in f.connection else b""
    # _make: the named tuple's keyword constructor costs a tenth of the whole parse
    return RequestHead._make((method, target, version, headers, framing, length,
                              _keep_alive(version, f.connection), upgrade,
                              f.expect == b"100-continue" and version == b"1.1", f.host))


# ---- responses --------------------------------------------------------------------------------

def parse_response_head(data: bytes, request_method: bytes,
                        limits: HeadLimits = HeadLimits()) -> ResponseHead:
    """Parse one complete response head to a request with ``request_method``."""
    if len(data) > limits.max_size:
        raise HeadError(f"response head larger than {limits.max_size} bytes", 502, "too_large")
    m = _RESPONSE_HEAD.fullmatch(data)
    if m is None:
        raise HeadError("malformed response head", 502)
    version, status_text, reason, block = m.groups()
    headers = _folded_fields(block) if _FOLDED.search(block) else \
        tuple(_RESPONSE_FIELD.findall(block))
    if len(headers) > limits.max_fields:
        raise HeadError(f"more than {limits.max_fields} response header fields", 502,
                        "too_large")
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
            line = block[pos:block.index(b"\n", pos)]  # ``low`` is one longer
            field = _FIELD_NAME_VALUE.match(line)
            assert field is not None  # the whole head matched: every line is a field
            found.append((pos, field.group(1), field.group(2) or b""))
            pos = low.find(name, pos + 1)
    # in the head's order, as the full parse sees them: the first bad field names the cause
    fields = tuple((n, v) for _, n, v in sorted(found))
    return _response(version, status_text, reason, fields, request_method)


def _response(version: bytes, status_text: bytes, reason: bytes | None, headers: Headers,
              request_method: bytes) -> ResponseHead:
    try:
        f = _scan_fields(headers)
    except HeadError as e:
        raise HeadError(str(e), 502, e.cause) from None
    status = int(status_text)
    if not 100 <= status <= 599:
        raise HeadError("response status outside 100-599", 502, "bad_status")
    if f.chunked and version == b"1.0":
        raise HeadError("Transfer-Encoding in an HTTP/1.0 response", 502, "te_on_http10")
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
    return ResponseHead._make((version, status, reason or b"", headers, framing, length,
                               keep_alive))


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
        m = _FIELD_NAME_VALUE.fullmatch(line)
        if m is None:
            raise HeadError("malformed folded response field", 502)
        out.append((m.group(1), m.group(2) or b""))
    return tuple(out)
