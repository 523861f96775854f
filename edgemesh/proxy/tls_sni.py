"""Sans-IO: the server name (SNI) a TLS client asks for, read from its first bytes.

The proxy never terminates TLS on https ports; it peeks at the ClientHello only to name the
connection in logs and metrics. ``client_hello_sni(data)`` looks at what has arrived so far
and answers: need more bytes, not TLS, or the name ("" when the hello carries none). It reads
at most ``MAX_HELLO`` bytes of handshake, across TLS records (a post-quantum key share can
push a ClientHello past one record), and never raises on any input.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_HELLO = 16384 + 5 * 4  # handshake bytes we are willing to look at, with record headers
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_HOST_NAME = 0


class SniStatus(enum.Enum):
    NEED_MORE = "need_more"  # a complete ClientHello has not arrived yet
    NOT_TLS = "not_tls"      # the bytes are not a TLS ClientHello (or one we cannot read)
    FOUND = "found"          # ``name`` is the SNI host name; "" when the hello has none


@dataclass(frozen=True)
class SniResult:
    status: SniStatus
    name: str = ""


NEED_MORE = SniResult(SniStatus.NEED_MORE)
NOT_TLS = SniResult(SniStatus.NOT_TLS)


def client_hello_sni(data: bytes) -> SniResult:
    """What the first bytes of a connection say about the TLS server name."""
    hello = _handshake_bytes(data[:MAX_HELLO])
    if isinstance(hello, SniResult):
        return hello
    if len(hello) < 4:
        return NEED_MORE if len(data) < MAX_HELLO else NOT_TLS
    if hello[0] != _CLIENT_HELLO:
        return NOT_TLS
    length = int.from_bytes(hello[1:4], "big")
    if len(hello) < 4 + length:
        return NEED_MORE if len(data) < MAX_HELLO and 4 + length <= MAX_HELLO else NOT_TLS
    name = _server_name(hello[4:4 + length])
    return NOT_TLS if name is None else SniResult(SniStatus.FOUND, name)


def _handshake_bytes(data: bytes) -> bytes | SniResult:
    """Concatenated payloads of the leading complete handshake records."""
    out, pos = bytearray(), 0
    while pos + 5 <= len(data):
        if data[pos] != _HANDSHAKE and out:
            break  # e.g. early data right behind the hello
        if data[pos] != _HANDSHAKE or data[pos + 1] != 3:
            return NOT_TLS
        size = int.from_bytes(data[pos + 3:pos + 5], "big")
        if size == 0 or size > 16384:
            return NOT_TLS
        if pos + 5 + size > len(data):
            break
        out += data[pos + 5:pos + 5 + size]
        pos += 5 + size
    if pos == 0 and ((data[:1] and data[0] != _HANDSHAKE) or (data[1:2] and data[1] != 3)):
        return NOT_TLS
    return bytes(out)


class _Reader:
    """Bounds-checked big-endian reads; ``ok`` turns False at the first overrun."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.ok = data, 0, True

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            self.ok = False
            return b""
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, size: int) -> bytes:
        return self.take(self.number(size))


def _server_name(body: bytes) -> str | None:
    """SNI from a ClientHello body; "" when absent, None when malformed."""
    r = _Reader(body)
    r.take(2 + 32)  # legacy_version, random
    r.vector(1)  # legacy_session_id
    r.vector(2)  # cipher_suites
    r.vector(1)  # legacy_compression_methods
    if not r.ok:
        return None
    if r.pos == len(body):
        return ""  # an old hello without extensions
    extensions = _Reader(r.vector(2))
    if not r.ok:
        return None
    while extensions.ok and extensions.pos < len(extensions.data):
        kind = extensions.number(2)
        payload = extensions.vector(2)
        if extensions.ok and kind == _EXT_SERVER_NAME:
            return _host_name(payload)
    return "" if extensions.ok else None


def _host_name(payload: bytes) -> str | None:
    r = _Reader(_Reader(payload).vector(2))
    while r.ok and r.pos < len(r.data):
        kind = r.number(1)
        name = r.vector(2)
        if r.ok and kind == _HOST_NAME:
            try:
                text = name.decode("ascii")
            except UnicodeDecodeError:
                return None
            valid = 0 < len(text) <= 253 and all(c.isalnum() or c in "-._" for c in text)
            return text.lower().rstrip(".") if valid else None
    return None
