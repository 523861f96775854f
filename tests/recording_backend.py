"""The endpoint behind the HTTP probes: it records exactly the bytes each connection brought and
splits them into requests with a STRICT reading of RFC 9112, so a request a front end smuggled
shows up as an extra request, and anything ambiguous it forwarded shows up as an error.

Strict means: CRLF only; ``token SP target SP HTTP/1.x``; field names are tokens with no space
before the colon; no obs-fold, NUL, bare CR; one ``Content-Length`` of digits only (below 2**63);
a ``Transfer-Encoding`` whose last coding is ``chunked``, never together with ``Content-Length``
nor on HTTP/1.0; chunk sizes of at most 16 hex digits (below 2**63), extensions without control
bytes, CRLF after the data; a target in origin-form, absolute-form (http/https, no userinfo,
``Host`` equal to its authority), ``*`` only for OPTIONS, authority-form only for CONNECT; one
``Host`` on HTTP/1.1, an RFC 3986 host with an optional numeric port.

Every request is answered ``200`` with ``X-Seen: <id> <target>`` and a body naming it, except:

- a target starting ``/early``: answered before its body is read (``/early413``: with 413), the
  body is then consumed as its framing says — what a server that answers early does;
- an ``Upgrade: h2c`` request: ``101 Switching Protocols``, then the connection is read as
  HTTP/1.1 again, so a front end that splices shows up as requests skipping its routes;
- ``/ws`` with ``Upgrade: websocket``: ``101`` (the intended tunnel); ``/ws-no``: ``200`` only;
- ``/redos-response``: a response head with blank fields then a malformed line (a ReDoS probe
  for the front end's response parser);
- ``HEAD``: the head of the 200 with its ``Content-Length`` and no body.
"""
from __future__ import annotations

import itertools
import socket
import threading
import time
from dataclasses import dataclass, field

from gevent.server import StreamServer

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                   b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_MAX_HEAD = 65536


class StrictError(Exception):
    """The bytes are not one strictly valid HTTP/1.1 request."""


@dataclass
class Seen:
    """One request as the backend read it."""
    id: int
    conn: int
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    complete: bool = False  # the whole body arrived
    answered: bool = False  # answered with a response naming it (X-Seen)
    at: float = 0.0

    def header(self, name: str) -> str | None:
        """The first value of ``name`` (any case), or None."""
        return next((v for n, v in self.headers if n.lower() == name), None)


@dataclass
class Conn:
    """What one connection brought: its raw bytes, its requests, and the error that ended it."""
    id: int
    raw: bytearray = field(default_factory=bytearray)
    requests: list[Seen] = field(default_factory=list)
    error: str = ""  # a strict-parse failure: the front end forwarded something ambiguous


def _is_token(b: bytes) -> bool:
    return bool(b) and all(c in _TCHAR for c in b)


def parse_head(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    """Request line and fields of ``head`` (without the final blank line), strictly."""
    if b"\x00" in head or b"\r" in head.replace(b"\r\n", b"") or b"\n" in head.replace(
            b"\r\n", b""):
        raise StrictError("NUL, bare CR or bare LF in head")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _is_token(parts[0]) or not parts[1]:
        raise StrictError(f"bad request line {lines[0][:80]!r}")
    if parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise StrictError(f"bad version {parts[2][:20]!r}")
    if any(c <= 0x20 or c >= 0x7f for c in parts[1]):
        raise StrictError("control or non-ASCII byte in target")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _is_token(name):
            raise StrictError(f"bad field line {line[:80]!r}")
        value = value.strip(b" \t")
        if any((c < 0x20 and c != 0x09) or c == 0x7f for c in value):
            raise StrictError(f"control byte in field {name!r}")
        headers.append((name.decode(), value.decode("latin-1")))
    return parts[0].decode(), parts[1].decode("latin-1"), parts[2].decode(), headers


_REG_NAME = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                      "-._~%!$&'()*+,;=")


def valid_host(value: str) -> bool:
    """RFC 3986 ``host [":" port]`` (reg-name, IPv4 or a bracketed IP literal)."""
    if value.startswith("["):
        literal, bracket, rest = value[1:].partition("]")
        ok = bool(literal and bracket) and all(c in "0123456789abcdefABCDEF:." for c in literal)
        return ok and (not rest or (rest[0] == ":" and rest[1:].isdigit()))
    host, colon, port = value.partition(":")
    return bool(host) and all(c in _REG_NAME for c in host) and (
        not colon or (port.isdigit() and port.isascii()))


def check_target(method: str, target: str, headers: list[tuple[str, str]],
                 version: str) -> None:
    """Raise ``StrictError`` unless the target form and Host agree, strictly."""
    hosts = [v for n, v in headers if n.lower() == "host"]
    if version == "HTTP/1.1" and len(hosts) != 1 or len(hosts) > 1:
        raise StrictError(f"{len(hosts)} Host fields")
    if hosts and hosts[0] and not valid_host(hosts[0]):
        raise StrictError(f"invalid Host {hosts[0][:60]!r}")
    if target.startswith("/") and method != "CONNECT":
        return
    if target == "*" and method == "OPTIONS":
        return
    if method == "CONNECT":
        if not valid_host(target) or ":" not in target:
            raise StrictError(f"CONNECT target {target[:60]!r}")
        return
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise StrictError(f"target not origin/absolute-form: {target[:60]!r}")
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    if "@" in authority or not valid_host(authority):
        raise StrictError(f"bad authority in {target[:60]!r}")
    if hosts and hosts[0].lower() != authority.lower():
        raise StrictError(f"Host {hosts[0][:40]!r} differs from the target's {authority!r}")


def framing(headers: list[tuple[str, str]], version: str = "HTTP/1.1") -> tuple[str, int]:
    """('length', n), ('chunked', 0) or ('none', 0) for a request's fields, strictly."""
    lengths = [v for n, v in headers if n.lower() == "content-length"]
    codings = [v for n, v in headers if n.lower() == "transfer-encoding"]
    if lengths and codings:
        raise StrictError("Content-Length with Transfer-Encoding")
    if codings and version == "HTTP/1.0":
        raise StrictError("Transfer-Encoding on HTTP/1.0")
    if codings:
        last = ",".join(codings).split(",")[-1].strip().lower()
        if last != "chunked":
            raise StrictError(f"Transfer-Encoding not ending in chunked: {codings!r}")
        return "chunked", 0
    if len(lengths) > 1:
        raise StrictError("more than one Content-Length")
    if lengths:
        if not lengths[0].isdigit() or not lengths[0].isascii() or len(
                lengths[0].lstrip("0")) > 18:
            raise StrictError(f"bad Content-Length {lengths[0]!r}")
        return "length", int(lengths[0])
    return "none", 0


class Reader:
    """A connection's bytes with blocking reads until enough have arrived."""

    def __init__(self, sock: socket.socket, conn: Conn) -> None:
        self.sock, self.conn, self.buf = sock, conn, bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.conn.raw += data
        self.buf += data

    def until(self, sep: bytes, limit: int) -> bytes:
        """Bytes up to ``sep`` (consumed, not returned)."""
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[:i + len(sep)]
                return out
            if len(self.buf) > limit:
                raise StrictError(f"no {sep!r} within {limit} bytes")
            self._fill()

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


def read_chunked(reader: Reader, seen: Seen) -> None:
    """Read a chunked body strictly into ``seen.body``, then the trailers."""
    while True:
        line = reader.until(b"\r\n", 4096)
        size, _, ext = line.partition(b";")
        if not size or len(size.lstrip(b"0")) > 15 or any(c not in _HEX for c in size):
            raise StrictError(f"bad chunk size {line[:40]!r}")
        if any(c < 0x20 and c != 0x09 or c == 0x7f for c in ext):
            raise StrictError("control byte in chunk extension")
        n = int(size, 16)
        if n == 0:
            break
        seen.body += reader.exactly(n)
        if reader.exactly(2) != b"\r\n":
            raise StrictError("chunk data not followed by CRLF")
    while True:
        trailer = reader.until(b"\r\n", 8192)
        if not trailer:
            return
        name, colon, _ = trailer.partition(b":")
        if not colon or not _is_token(name):
            raise StrictError(f"bad trailer {trailer[:40]!r}")


def _response(seen: Seen, status: str = "200 OK", extra: bytes = b"") -> bytes:
    target = "".join(c if 0x20 < ord(c) < 0x7f else "?" for c in seen.target)[:200]
    body = f"seen {seen.id} {seen.method} {target} {len(seen.body)}\n".encode()
    head = (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n"
            f"X-Seen: {seen.id} {target}\r\nX-Method: {seen.method}\r\n").encode() \
        + extra + b"\r\n"
    return head if seen.method == "HEAD" else head + body


def _switch(seen: Seen, protocol: bytes) -> bytes:
    accept = b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" \
        if protocol == b"websocket" else b""
    return (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "
            + protocol + b"\r\n" + b"X-Seen: %d %s\r\n" % (seen.id, seen.target.encode("latin-1"))
            + accept + b"\r\n")


REDOS_RESPONSE = (b"HTTP/1.1 200 OK\r\n" + (b"X-Blank:" + b" " * 64 + b"\r\n") * 4
                  + b"bad line\r\n\r\n")


class RecordingBackend:
    """A strict, recording HTTP/1.1 endpoint on ``host``:``port`` (0: any free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.conns: list[Conn] = []
        self._ids = itertools.count(1)
        self._conn_ids = itertools.count(1)
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.server = StreamServer((host, port), self._handle)
        self.server.start()

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.reset()
        self.server.stop(timeout=1)

    def reset(self) -> None:
        """Close every open connection (front ends' pools empty) and forget what was seen."""
        for sock in list(self._socks):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns = []

    def requests(self) -> list[Seen]:
        """Every request seen since the last reset, in arrival order."""
        return sorted((r for c in list(self.conns) for r in c.requests), key=lambda r: r.id)

    def errors(self) -> list[str]:
        """Strict-parse failures since the last reset, each with the connection's raw bytes."""
        return [f"{c.error} (connection bytes {bytes(c.raw)[:300]!r})"
                for c in list(self.conns) if c.error]

    def _handle(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        conn = Conn(next(self._conn_ids))
        self.conns.append(conn)
        self._socks.add(sock)
        sock.settimeout(30)
        reader = Reader(sock, conn)
        try:
            while self._one(reader, sock, conn):
                pass
        except StrictError as e:
            conn.error = str(e)
            try:
                sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
            except OSError:
                pass
        except (EOFError, OSError):
            pass
        finally:
            self._socks.discard(sock)
            sock.close()

    def _one(self, reader: Reader, sock: socket.socket, conn: Conn) -> bool:
        try:
            head = reader.until(b"\r\n\r\n", _MAX_HEAD)
        except EOFError:
            if reader.buf:
                conn.error = f"connection closed inside a head: {bytes(reader.buf)[:80]!r}"
            return False
        method, target, version, headers = parse_head(head)
        seen = Seen(next(self._ids), conn.id, method, target, version, headers, at=time.monotonic())
        conn.requests.append(seen)
        check_target(method, target, headers, version)
        kind, length = framing(headers, version)
        upgrade = (seen.header("upgrade") or "").lower() if "upgrade" in (
            seen.header("connection") or "").lower() else ""
        early = target.startswith("/early")
        if early:
            sock.sendall(_response(seen, "413 Payload Too Large" if target.startswith(
                "/early413") else "200 OK"))
            seen.answered = True
        elif (seen.header("expect") or "").lower() == "100-continue":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if kind == "length":
            seen.body = reader.exactly(length)
        elif kind == "chunked":
            read_chunked(reader, seen)
        seen.complete = True
        if early:
            return True
        if "h2c" in upgrade:
            sock.sendall(_switch(seen, b"h2c"))
            seen.answered = True
            return True
        if target == "/ws" and "websocket" in upgrade:
            sock.sendall(_switch(seen, b"websocket"))
            seen.answered = True
            return True
        if target == "/redos-response":
            sock.sendall(REDOS_RESPONSE)
            return False
        sock.sendall(_response(seen))
        seen.answered = True
        return version == "HTTP/1.1" and (seen.header("connection") or "").lower() != "close"


def main() -> None:
    """``python -m tests.recording_backend PORT``: a backend printing what it saw, for manual
    probing."""
    import sys

    import gevent

    backend = RecordingBackend(port=int(sys.argv[1]))
    while True:
        gevent.sleep(2)
        for r in backend.requests():
            print(r)
        for e in backend.errors():
            print("ERROR", e)
        backend.conns = []


if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()
    main()
