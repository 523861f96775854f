"""The wire format of list and watch responses, without I/O (docs/specs/watch.md).

``LineSplitter`` turns the bytes of a chunked watch body into newline-delimited JSON documents
whatever the chunk boundaries (K4.1); ``decode_event`` checks one document is a watch event
(K4.4); ``list_page`` reads one page of a list (K2); ``status_error`` maps an ERROR event or a
non-200 ``Status`` body onto the errors the watch loop acts on (K5).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edgemesh.errors import EdgeMeshError, RemoteProtocolError, UnavailableError

MAX_EVENT_BYTES = 32 * 1024 * 1024  # one watch event; a huge Endpoints object is a few MB
EVENT_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"})


class ApiError(UnavailableError):
    """The API answered with an error status (HTTP, or an ERROR event's ``code``)."""

    def __init__(self, code: int, message: str, retry_after: float = 0.0) -> None:
        super().__init__(f"{code}: {message}" if message else str(code))
        self.code = code
        self.retry_after = retry_after


class Expired(EdgeMeshError):
    """410 Gone/Expired: the resourceVersion or continue token is too old; relist (K5.1/K5.2)."""


class LineSplitter:
    """Bytes in, complete lines out; a line longer than ``limit`` is a protocol error."""

    def __init__(self, limit: int = MAX_EVENT_BYTES) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        if b"\n" not in data:
            if len(self._buf) > self._limit:
                raise RemoteProtocolError(f"watch event longer than {self._limit} bytes")
            return []
        *lines, rest = bytes(self._buf).split(b"\n")
        self._buf = bytearray(rest)
        return [line for line in lines if line.strip()]

    @property
    def pending(self) -> int:
        return len(self._buf)


@dataclass(frozen=True)
class WatchEvent:
    type: str
    object: dict[str, Any]

    @property
    def resource_version(self) -> str:
        meta = self.object.get("metadata")
        rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
        return rv if isinstance(rv, str) else ""


def decode_event(line: bytes) -> WatchEvent:
    """One newline-delimited watch document → a ``WatchEvent`` (``RemoteProtocolError`` if not)."""
    try:
        doc = json.loads(line)
    except ValueError as e:
        raise RemoteProtocolError(f"watch event is not JSON: {e}") from None
    except RecursionError:
        raise RemoteProtocolError("watch event nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str) or \
            doc["type"] not in EVENT_TYPES or \
            not isinstance(doc.get("object"), dict):
        raise RemoteProtocolError(f"not a watch event: {line[:200]!r}")
    return WatchEvent(doc["type"], doc["object"])


def status_error(status: dict[str, Any], http_code: int = 0,
                 retry_after: float = 0.0) -> EdgeMeshError:
    """The error a ``Status`` object (ERROR event object or error body) stands for."""
    code = status.get("code") if isinstance(status.get("code"), int) else http_code
    message = str(status.get("message") or status.get("reason") or "")
    if code == 410:
        return Expired(message or "resource version expired")
    return ApiError(code or http_code, message, retry_after)


@dataclass(frozen=True)
class ListPage:
    items: list[Any]
    resource_version: str
    continue_token: str


def list_page(body: bytes) -> ListPage:
    """One page of a list response (K2): items (null/absent = empty), its RV and continue."""
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise RemoteProtocolError(f"list response is not JSON: {e}") from None
    except RecursionError:
        raise RemoteProtocolError("list response nested too deeply") from None
    if not isinstance(doc, dict):
        raise RemoteProtocolError("list response is not an object")
    items = doc.get("items") or []
    meta = doc.get("metadata") or {}
    if not isinstance(items, list) or not isinstance(meta, dict):
        raise RemoteProtocolError("list response has no items list")
    rv = meta.get("resourceVersion")
    token = meta.get("continue")
    return ListPage(items, rv if isinstance(rv, str) else "",
                    token if isinstance(token, str) else "")


def retry_after_seconds(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0  # an HTTP date: ignore it, our own backoff applies


def object_key(obj: dict[str, Any], namespaced: bool) -> tuple[str, str] | None:
    """(namespace, name) of a raw object, even a malformed one, or None without a name."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    ns = meta.get("namespace") if namespaced else ""
    return (ns if isinstance(ns, str) and ns else ("default" if namespaced else ""),
            meta["name"])
