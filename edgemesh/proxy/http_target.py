"""Sans-IO request targets: what a request names, normalised once, before anything routes on it.

``normalize_request(target, host)`` splits an origin-form (``/p?q``) or absolute-form
(``http://authority/p?q``) request-target and returns a ``NormalTarget``: the effective
authority, the normalised path and the query as sent. Everything that routes (the gateway's
``GatewayRouter``, the per-request proxy's ``HttpPort``) decides on it, and what goes upstream
is built from it (origin-form, ``Host`` = the effective authority), so the endpoint reads
exactly the path the routes were matched against. Anything else is a ``TargetError`` (400,
the client's fault). Every step is a split, join, translate or find: linear in the target's
length, no regular expression.

Path normalisation is Istio's default ``BASE`` (Envoy's ``normalize_path``, RFC 3986 §6.2.2),
plus merged slashes:

- percent-encoded *unreserved* characters are decoded (``%41`` → ``A``, ``%2e`` → ``.``,
  ``%7E`` → ``~``; RFC 3986 §6.2.2.2, Istio's normalisation table); every other escape is
  kept, its hex digits upper-cased (§6.2.2.1) — except ``%2F`` and ``%5C``, which are decoded
  to ``/`` (Istio's ``DECODE_AND_MERGE_SLASHES``, Envoy's ``UNESCAPE_AND_FORWARD``, what nginx
  does before it matches locations). Istio's ``BASE`` keeps them encoded, but then
  ``/p%2F..%2Fadmin`` matches no ``/admin`` deny route while the many backends that decode
  before they route serve ``/admin``; Istio's security best practices name decoding the
  strict choice. A backend that needs an encoded slash inside one segment does not get it
  through the mesh; ``DECODE_SLASHES`` below switches it off.
- ``%00`` and a malformed escape (``%zz``, a lone ``%``) are refused; Istio refuses ``%00``
  with 400 and nginx any bad escape.
- ``\\`` becomes ``/`` (Envoy's normaliser, Chromium's URL library, does so for http URLs).
- Characters RFC 3986 does not allow in a path (``"<>^`{|}``) are percent-encoded, as
  Envoy's normaliser does; a ``#`` anywhere in the target is refused (a request-target has no
  fragment, RFC 9112 §3.2).
- Dot segments are removed (RFC 3986 §5.2.4 ``remove_dot_segments``), after the decoding, so
  ``/a/%2e%2e/b`` is ``/b``. A path that climbs above the root is clamped there
  (``/../admin`` → ``/admin``), as RFC 3986 and Envoy do; the result is the same path any
  server that resolves dot segments would serve, so clamping cannot step around a route.
- A dot segment carrying path parameters (``..;x``, ``.;``) is refused: Tomcat and other
  servlet containers drop the parameters and climb (``/p/..;/admin`` is ``/admin`` to them),
  while to RFC 3986 it is an ordinary segment that no route would match as ``..``.
- Adjacent slashes are merged (``//admin`` → ``/admin``), in the same pass as the dot
  segments (``/a//../b`` → ``/b``, nginx's order). Istio's default ``BASE`` does not merge
  (``MERGE_SLASHES`` does, and Istio and Envoy's edge best practices recommend it): without it
  ``//admin/x`` matches no ``/admin`` deny route yet reaches a backend that reads it as
  ``/admin/x``; nginx merges by default too. ``MERGE_SLASHES`` below switches it.
- The query is not normalised (it is not a path); it is kept byte for byte.

Authorities: ``Host`` and the absolute URI's authority must each be an RFC 3986 authority,
read strictly — a reg-name of letters, digits, ``-``, ``.``, ``_``, ``~`` (no ``/``, space,
``@``, ``%``, ``*``...), or an IPv6 literal in brackets, then an optional port (up to 65535).
The host is lower-cased and one trailing dot removed (nginx's ``$host``); an empty port
(``host:``) is dropped. The absolute URI's authority wins over ``Host`` (RFC 9112 §3.2.2), but
when both are given and differ — host case-insensitively, ports compared with the scheme's
default filled in (``http://a/`` equals ``Host: a:80``) — the request is refused: whoever sent
it means something different from what one of the two readers will see. Userinfo
(``http://u@host/``) is refused (RFC 9110 §4.2.4). Absolute-form takes ``http`` and ``https``
only.
"""
from __future__ import annotations

import ipaddress
from typing import NamedTuple

from edgemesh.proxy.http_head import HeadError

MERGE_SLASHES = True  # see the module docstring
DECODE_SLASHES = True  # %2F and %5C decoded to "/" (see the module docstring)
MAX_PORT = 65535
DEFAULT_PORTS = {b"http": 80, b"https": 443}

_ALPHA = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_DIGIT = b"0123456789"
_UNRESERVED = _ALPHA + _DIGIT + b"-._~"
_SUB_DELIMS = b"!$&'()*+,;="
_PATH_OK = _UNRESERVED + _SUB_DELIMS + b":@/"  # pchar and "/", "%" aside
_PATH_ENCODE = b'"<>^`{|}'  # visible ASCII a path may not hold; Envoy escapes them
_REG_NAME = _UNRESERVED
_HEX = b"0123456789ABCDEFabcdef"
_UNRESERVED_SET = frozenset(_UNRESERVED)
_HEX_SET = frozenset(_HEX)
_SLASHES = frozenset(b"/\\")  # %2F, %5C
_VISIBLE = bytes(range(0x21, 0x7F))
_PLAIN_TARGET = _PATH_OK + b"?"  # an origin-form target made of these needs no work
MAX_REMEMBERED = 1024
MAX_REMEMBERED_BYTES = 512  # longer targets are normalised every time: the caches stay small
_remembered: dict[bytes, Authority] = {}
_normal: dict[tuple[bytes, bytes | None], NormalTarget] = {}


class TargetError(HeadError):
    """A request-target or authority that cannot be routed safely: 400, the client's fault.

    ``cause`` (``bad_target``, ``bad_path``, ``bad_host``, ``authority_mismatch``) is the
    label such refusals are counted by."""

    def __init__(self, message: str, cause: str = "bad_target") -> None:
        super().__init__(message, 400, cause)


class Authority(NamedTuple):
    """A validated authority: ``host`` lower-case (IPv6 in brackets), ``port`` if given."""
    host: bytes
    port: int | None = None

    def text(self) -> bytes:
        """The authority as sent upstream in ``Host``: host, then ``:port`` if one was given."""
        return self.host if self.port is None else self.host + b":%d" % self.port

    def same_as(self, other: Authority, scheme: bytes) -> bool:
        """Equal under RFC 3986 §6.2.3: a missing port is the scheme's default port."""
        default = DEFAULT_PORTS.get(scheme)
        return self.host == other.host and \
            (self.port or default) == (other.port or default)


class NormalTarget(NamedTuple):
    """A request's effective authority and normalised origin-form target (a named tuple:
    built on every request of the per-request proxy, so it must be cheap)."""
    authority: Authority | None  # None: neither an absolute URI nor Host named one
    path: bytes  # normalised, starts with "/"
    query: bytes | None  # after "?", byte for byte; None when there is no "?"
    absolute: bool = False  # the client sent absolute-form

    @property
    def origin(self) -> bytes:
        """The origin-form target to send upstream: path, then ``?query`` if there was one."""
        return self.path if self.query is None else self.path + b"?" + self.query

    @property
    def hostname(self) -> str:
        """The host routes are matched by: lower-case, no port, no trailing dot."""
        return self.authority.host.decode("ascii") if self.authority is not None else ""


def normalize_request(target: bytes, host: bytes | None) -> NormalTarget:
    """The normalised target of a request with ``Host`` field ``host`` (None: none sent),
    remembered: a port sees the same few targets again and again, and building even the
    unchanged answer costs ~10 % of a proxied request (``MAX_REMEMBERED`` of them; refusals
    are not remembered)."""
    key = (target, host)
    found = _normal.get(key)
    if found is None:
        found = _normalize_request(target, host)
        if len(target) + len(host or b"") <= MAX_REMEMBERED_BYTES:  # a bounded cache
            if len(_normal) >= MAX_REMEMBERED:
                _normal.clear()
            _normal[key] = found
    return found


def _normalize_request(target: bytes, host: bytes | None) -> NormalTarget:
    given = authority_of(host) if host else None
    if target[:1] == b"/" and not target.translate(None, _PLAIN_TARGET) and \
            b"/." not in target and b"//" not in target:
        path, q, rest = target.partition(b"?")  # the common case: nothing to normalise
        return NormalTarget(given, path, rest if q else None)
    if b"#" in target:
        raise TargetError("a fragment in the request-target")
    if target.translate(None, _VISIBLE):
        raise TargetError("a blank or control character in the request-target")
    if target[:1] == b"/":
        path, q, rest = target.partition(b"?")
        return NormalTarget(given, normalize_path(path), rest if q else None)
    uri_scheme, authority, path, query = split_absolute(target)
    if given is not None and not given.same_as(authority, uri_scheme):
        raise TargetError("the absolute URI's authority and Host differ", "authority_mismatch")
    if host is not None and given is None:
        raise TargetError("an empty Host with an absolute URI", "authority_mismatch")
    return NormalTarget(authority, normalize_path(path), query, absolute=True)


def authority_of(raw: bytes) -> Authority:
    """``parse_authority``, remembered: a listener sees the same few Host values again and
    again (``MAX_REMEMBERED`` of them; refusals are not remembered)."""
    found = _remembered.get(raw)
    if found is None:
        found = parse_authority(raw)
        if len(raw) <= MAX_REMEMBERED_BYTES:
            if len(_remembered) >= MAX_REMEMBERED:
                _remembered.clear()
            _remembered[raw] = found
    return found


def split_absolute(target: bytes) -> tuple[bytes, Authority, bytes, bytes | None]:
    """``(scheme, authority, path, query)`` of an absolute-form target (``http`` or ``https``)."""
    scheme, sep, rest = target.partition(b"://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        raise TargetError("the request-target is neither origin-form nor an http(s) URI")
    ends = [i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0]
    end = min(ends) if ends else len(rest)
    raw_authority, rest = rest[:end], rest[end:]
    if not raw_authority:
        raise TargetError("an absolute URI without a host", "bad_host")
    path, q, query = rest.partition(b"?")
    return scheme, parse_authority(raw_authority), path or b"/", query if q else None


def parse_authority(raw: bytes) -> Authority:
    """A strict RFC 3986 ``host [":" port]``; raises ``TargetError`` (``bad_host``)."""
    if raw.startswith(b"["):
        close = raw.find(b"]")
        if close < 0:
            raise TargetError("an unclosed IPv6 literal in the authority", "bad_host")
        host, rest = _ipv6_literal(raw[1:close]), raw[close + 1:]
        if rest and rest[:1] != b":":
            raise TargetError("bytes after an IPv6 literal in the authority", "bad_host")
        port_text = rest[1:] if rest else None
    else:
        name, colon, port_text_ = raw.partition(b":")
        port_text = port_text_ if colon else None
        if not name or name.translate(None, _REG_NAME):
            raise TargetError("a host that is not an RFC 3986 reg-name", "bad_host")
        host = name.lower()
        if host.endswith(b".") and len(host) > 1:
            host = host[:-1]
        if host.startswith(b".") or b".." in host:
            raise TargetError("an empty label in the host", "bad_host")
    return Authority(host, _port(port_text))


def _ipv6_literal(inside: bytes) -> bytes:
    try:
        address = ipaddress.IPv6Address(inside.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise TargetError("a bad IPv6 literal in the authority", "bad_host") from None
    return b"[" + address.compressed.encode("ascii") + b"]"


def _port(text: bytes | None) -> int | None:
    if not text:
        return None  # "host:" has an empty port: RFC 3986 §6.2.3 drops it
    if len(text) > 5 or text.translate(None, _DIGIT):
        raise TargetError("a bad port in the authority", "bad_host")
    port = int(text)
    if port > MAX_PORT:
        raise TargetError("a port over 65535 in the authority", "bad_host")
    return port


def normalize_path(path: bytes) -> bytes:
    """``path`` (from its leading ``/`` up to any ``?``) normalised as the module docstring says."""
    if path[:1] != b"/":
        raise TargetError("a path that does not start with '/'", "bad_path")
    if not path.translate(None, _PATH_OK) and b"/." not in path and b"//" not in path:
        return path  # nothing to do: the common case, found at C speed
    if b"\\" in path:
        path = path.replace(b"\\", b"/")
    if b"%" in path:
        path = _decode_unreserved(path)
    odd = path.translate(None, _PATH_OK + b"%")
    if odd:
        path = _encode(path, odd)
    return _remove_dot_segments(path)


def _decode_unreserved(path: bytes) -> bytes:
    parts = path.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX_SET or part[1] not in _HEX_SET:
            raise TargetError("a malformed percent-escape in the path", "bad_path")
        value = int(part[:2], 16)
        if value == 0:
            raise TargetError("%00 in the path", "bad_path")
        if value in _UNRESERVED_SET:
            out.append(bytes((value,)) + part[2:])
        elif value in _SLASHES and DECODE_SLASHES:
            out.append(b"/" + part[2:])
        else:
            out.append(b"%" + part[:2].upper() + part[2:])
    return b"".join(out)


def _encode(path: bytes, odd: bytes) -> bytes:
    for byte in set(odd):
        if byte not in _PATH_ENCODE:
            raise TargetError("a character a path may not hold", "bad_path")
        path = path.replace(bytes((byte,)), b"%%%02X" % byte)
    return path


def _remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 §5.2.4 on a path starting with "/", clamped at the root; empty segments
    dropped when ``MERGE_SLASHES`` (a trailing one kept, so ``/a/`` stays ``/a/``)."""
    segments = path.split(b"/")[1:]
    last = len(segments) - 1
    out: list[bytes] = []
    for i, seg in enumerate(segments):
        if seg[:2] == b".;" or seg[:3] == b"..;":
            raise TargetError("a dot segment with path parameters", "bad_path")
        if seg == b"..":
            if out:
                out.pop()
        elif seg == b"." or (not seg and MERGE_SLASHES and i != last):
            pass
        else:
            out.append(seg)
            continue
        if i == last:
            out.append(b"")  # "/a/.." is "/a/": a final dot segment leaves a directory
    return b"/" + b"/".join(out)
