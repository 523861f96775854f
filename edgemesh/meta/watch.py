"""The list+watch decisions for one kind, without I/O (docs/specs/watch.md, rules ``Kx``).

``KindMachine`` is asked what to send next (``next_request``: a list page or a watch, with the
resourceVersion or continue token to use) and told what came back (``on_page``, ``on_event``,
``on_watch_end``, ``on_failure``). It answers with store operations (``Stage``/``Commit`` for
a list, ``Upsert``/``Delete`` for events, ``Clear`` when a kind goes away) and, after a failure,
with a ``Retry`` saying how long to wait and why. It sends nothing, sleeps nowhere and logs
nothing; the time and the random source are passed in. ``edgemesh.meta.kube.KubeSource`` is the
loop around it: ask, do the HTTP, apply the ops, sleep.

The rules it decides:

- K2.5/K2.6: lists are paged (``limit``/``continue``); the first list asks ``resourceVersion=0``,
  a list after a 410 asks none (a consistent read); a failed page restarts the list;
- K3: watches ask ``watch=true``, ``allowWatchBookmarks=true``, a ``timeoutSeconds`` drawn in
  300-600 and the last RV seen (none after an empty metaServer list without RV, K10.3);
- K4.3/K4.4/K6: every event's RV (bookmarks included) becomes the RV to resume from; ``ADDED``
  of a known object is an update; a clean end re-watches at once;
- K5.1/K5.2: 410 (an ``ERROR`` event or an HTTP status) relists without RV, backing off when
  410s come in a row; K5.3: 504 relists at once; K5.4: other errors back off (0.8 s doubling to
  ``backoff_max``, jitter, ``Retry-After`` honoured) and re-watch; three in a row relist;
- K10.4: a server that replays ``ADDED`` at the same RV ignores the watch RV, so every re-watch
  relists first;
- K1: EndpointSlices refused (403/404) fall back to core/v1 Endpoints; an optional kind refused
  is "feature off": emptied and retried every ``optional_retry`` seconds.
"""
from __future__ import annotations

import datetime
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgemesh.errors import EdgeMeshError, RemoteProtocolError
from edgemesh.meta import kinds
from edgemesh.meta.kinds import Kind
from edgemesh.meta.kubewire import (
    ApiError,
    Expired,
    ListPage,
    WatchEvent,
    object_key,
    status_error,
)

RELIST_AFTER_FAILURES = 3  # K5.4
PAGE_SIZE = 500  # K2.5
BACKOFF_BASE = 0.8  # K5.4
QUICK_EOF_SECONDS = 1.0  # an empty stream that ends sooner than this counts as a failure
WATCH_SECONDS = (300, 600)  # K3.4


class Random(Protocol):
    def uniform(self, a: float, b: float) -> float: ...
    def randint(self, a: int, b: int) -> int: ...


class Refused(EdgeMeshError):
    """The API answered the request itself with an error status (not an event in a stream):
    ``error`` is what its ``Status`` body stands for (``Expired`` or ``ApiError``)."""

    def __init__(self, http_status: int, error: EdgeMeshError) -> None:
        super().__init__(str(error))
        self.http_status = http_status
        self.error = error


# ---- what to send ---------------------------------------------------------------------

@dataclass(frozen=True)
class ListRequest:
    """One page of a list (K2.5, K2.6)."""
    path: str
    limit: int
    resource_version: str = ""
    continue_token: str = ""

    @property
    def params(self) -> dict[str, str]:
        params = {"limit": str(self.limit)}
        if self.continue_token:
            params["continue"] = self.continue_token
        elif self.resource_version:
            params["resourceVersion"] = self.resource_version
        return params


@dataclass(frozen=True)
class WatchRequest:
    """A watch from ``resource_version`` that the server ends after ``timeout`` seconds (K3)."""
    path: str
    resource_version: str
    timeout: int

    @property
    def params(self) -> dict[str, str]:
        params = {"watch": "true", "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(self.timeout)}
        if self.resource_version:
            params["resourceVersion"] = self.resource_version
        return params


# ---- what to write to the store --------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """Items of one list page: parse and keep them until the list's ``Commit``."""
    items: list[Any]


@dataclass(frozen=True)
class Commit:
    """The list is complete: ``kind`` (in ``namespace`` only, if set) holds exactly what was
    staged since the list's first page; a malformed item keeps its last good state."""
    kind: str
    namespace: str
    count: int


@dataclass(frozen=True)
class Upsert:
    kind: str
    raw: dict[str, Any]


@dataclass(frozen=True)
class Delete:
    kind: str
    namespace: str
    name: str


@dataclass(frozen=True)
class Clear:
    """``kind`` (in ``namespace`` only, if set) holds nothing any more."""
    kind: str
    namespace: str


@dataclass(frozen=True)
class Recovered:
    """List+watch works again; ``failures`` and ``last_error`` are what it had before."""
    failures: int
    last_error: str


@dataclass(frozen=True)
class ReplayDetected:
    """The server replays objects on every watch (K10.4): from now on, relist on reconnect."""


StoreOp = Stage | Commit | Upsert | Delete | Clear | Recovered | ReplayDetected


# ---- what went wrong, and what to do about it --------------------------------------------

@dataclass(frozen=True)
class Failure:
    """A failed request or stream, as the machine needs to know it."""
    text: str
    code: int = 0  # the Status code (HTTP or an ERROR event's); 0 for transport failures
    http_status: int = 0  # the HTTP status that answered the request (``Refused``), if any
    retry_after: float = 0.0
    expired: bool = False  # 410: the RV or continue token is too old

    @classmethod
    def of(cls, error: BaseException, text: str = "") -> Failure:
        """``error`` as raised by the loop: ``Refused``, ``Expired``, ``ApiError`` or any other
        (a transport failure); ``text`` describes it (default ``str(error)``)."""
        text = text or str(error) or type(error).__name__
        http_status = error.http_status if isinstance(error, Refused) else 0
        inner = error.error if isinstance(error, Refused) else error
        if isinstance(inner, Expired):
            return cls(text, 410, http_status, expired=True)
        if isinstance(inner, ApiError):
            return cls(text, inner.code, http_status, inner.retry_after)
        return cls(text)


@dataclass(frozen=True)
class Retry:
    """Wait ``after`` seconds, apply ``ops``, then ask ``next_request`` again.

    ``why``: ``expired`` (relist, K5.1/K5.2), ``fallback`` (EndpointSlices → Endpoints),
    ``feature_off`` (``report``: the reason is new, say so once) or ``failed`` (K5.4);
    ``reason`` says why a kind is refused (``fallback``, ``feature_off``)."""
    after: float
    why: str
    ops: list[StoreOp] = field(default_factory=list)
    report: bool = False
    reason: str = ""


def backoff(failures: int, base: float, cap: float, rng: Random) -> float:
    """K5.4: ``base`` doubling per failure up to ``cap``, times a jitter in [0.5, 1]."""
    delay = min(cap, base * 2.0 ** max(0, failures - 1))
    return delay * rng.uniform(0.5, 1.0)


Held = Callable[[str, str, str], "tuple[str, str] | None"]  # (kind, ns, name) -> (uid, rv)


def _nothing_held(kind: str, namespace: str, name: str) -> tuple[str, str] | None:
    return None


@dataclass
class KindMachine:
    """One kind's list+watch state and decisions (``/debug/meta`` shows ``view()``)."""
    slot: str  # the kind this loop was started for ("EndpointSlice" even after falling back)
    kind: Kind  # what it lists and watches now
    required: bool
    namespace: str = ""  # list+watch in this namespace only ("": cluster-wide)
    backoff_max: float = 30.0
    optional_retry: float = 60.0
    page_size: int = PAGE_SIZE
    rng: Random = field(default=random, repr=False)
    held: Held = field(default=_nothing_held, repr=False)  # what the store holds now
    rv: str = ""
    list_rv: str = "0"  # resourceVersion for the next list: "0" first, "" after a 410 (K2.6)
    need_list: bool = True
    listed: bool = False
    failures: int = 0
    expired_in_row: int = 0
    last_error: str = ""
    error_since: float = 0.0
    feature_off: str = ""
    replays: bool = False  # the server ignores the watch RV and replays ADDED (K10.4)
    _token: str = field(default="", repr=False)  # the list's continue token, between pages
    _page_rv: str = field(default="", repr=False)  # the list's RV, from its first pages
    _count: int = field(default=0, repr=False)
    _since: str = field(default="", repr=False)  # the RV the current watch was opened at

    @property
    def what(self) -> str:
        """The kind, and its namespace when the loop watches one namespace only (for logs)."""
        return f"{self.kind.name} in {self.namespace}" if self.namespace else self.kind.name

    @property
    def path(self) -> str:
        return self.kind.path(self.namespace)

    @property
    def backoff_base(self) -> float:
        return min(BACKOFF_BASE, self.backoff_max)

    def view(self) -> dict[str, Any]:
        return {"kind": self.kind.name, "resourceVersion": self.rv, "synced": self.listed,
                "required": self.required, "lastError": self.last_error,
                "failingSince": iso(self.error_since) if self.error_since else "",
                "featureOff": self.feature_off, "replayingServer": self.replays}

    # ---- requests ----------------------------------------------------------------------------

    def next_request(self) -> ListRequest | WatchRequest:
        """A list page while a list is needed, else a watch from the last RV (K7). Each call
        starts a request: the answers fed next (``on_page``, ``on_event``...) are its."""
        if self.need_list:
            if self._token:
                return ListRequest(self.path, self.page_size, continue_token=self._token)
            self._page_rv, self._count = "", 0
            return ListRequest(self.path, self.page_size, resource_version=self.list_rv)
        self._since = self.rv
        return WatchRequest(self.path, self.rv, self.rng.randint(*WATCH_SECONDS))

    # ---- answers -----------------------------------------------------------------------------

    def on_page(self, page: ListPage) -> list[StoreOp]:
        """One list page (K2): stage its items; the last page commits the list (K7)."""
        ops: list[StoreOp] = [Stage(page.items)]
        self._count += len(page.items)
        self._page_rv = self._page_rv or page.resource_version
        self._token = page.continue_token
        if self._token:
            return ops
        ops.append(Commit(self.kind.name, self.namespace, self._count))
        # An empty offline metaServer list has no RV (K10.3): watch with "" and expect a replay.
        self.rv, self.need_list, self.listed, self.expired_in_row = self._page_rv, False, True, 0
        ops.append(self._recovered())
        return ops

    def on_event(self, ev: WatchEvent) -> list[StoreOp]:
        """One watch event (K4); an ERROR raises what it stands for (K5.1: ``Expired``)."""
        if ev.type == "ERROR":
            raise status_error(ev.object)
        ops: list[StoreOp] = []
        name = self.kind.name
        if ev.type in ("ADDED", "MODIFIED"):
            if ev.type == "ADDED" and self._is_replay(ev.object):
                self.replays = True
                ops.append(ReplayDetected())
            ops.append(Upsert(name, ev.object))
        elif ev.type == "DELETED":
            key = object_key(ev.object, self.kind.namespaced)
            if key:
                ops.append(Delete(name, *key))
        if ev.resource_version:  # K4.3: a BOOKMARK only moves the RV
            self.rv = ev.resource_version
        if self.failures:
            ops.append(self._recovered())
        return ops

    def on_watch_end(self, events: int, seconds: float, dropped: bool) -> None:
        """The stream ended (K6.1) or dropped (K6.3) after ``events`` events: re-watch, or
        relist first for a replaying server (K10.4). One that ends at once, empty, failed."""
        if not events and seconds < QUICK_EOF_SECONDS:
            raise RemoteProtocolError("watch stream " + ("dropped" if dropped else "ended") +
                                      " at once without events")
        if self.replays:
            self.need_list = True  # a replaying server never reports deletions made meanwhile

    def on_failure(self, failure: Failure, now: float) -> Retry:
        """What to do after ``failure`` (``now``: wall-clock seconds, for ``error_since``)."""
        self._token = ""  # a failed list starts over (K2.5)
        if failure.http_status in (403, 404) and self._may_be_off():
            return self._feature_off(f"HTTP {failure.http_status} for {self.path}")
        if failure.expired:
            return self._expired()
        return self._failed(failure, now)

    # ---- decisions -----------------------------------------------------------------------------

    def _expired(self) -> Retry:
        """K5.1/K5.2: relist without RV; a server that keeps saying 410 is not hammered."""
        self.list_rv, self.need_list = "", True
        self.expired_in_row += 1
        after = self._backoff(self.expired_in_row - 1) if self.expired_in_row > 1 else 0.0
        return Retry(after, "expired")

    def _may_be_off(self) -> bool:
        return self.kind.optional or not self.required or self.kind is kinds.ENDPOINT_SLICE

    def _feature_off(self, reason: str) -> Retry:
        if self.slot == "EndpointSlice" and self.kind is kinds.ENDPOINT_SLICE:
            self.kind, self.need_list, self.list_rv, self.rv = kinds.ENDPOINTS, True, "0", ""
            return Retry(0.0, "fallback", [Clear(kinds.ENDPOINT_SLICE.name, "")],
                         reason=reason)
        report = self.feature_off != reason
        self.feature_off, self.need_list, self.list_rv = reason, True, "0"
        return Retry(self.optional_retry * self.rng.uniform(0.9, 1.1), "feature_off",
                     [Clear(self.kind.name, self.namespace)], report, reason)

    def _failed(self, failure: Failure, now: float) -> Retry:
        """K5.4, with K5.3: a 504 relists at once."""
        self.failures += 1
        if not self.last_error:
            self.error_since = now
        self.last_error = failure.text
        if self.failures >= RELIST_AFTER_FAILURES or failure.code == 504:
            self.need_list, self.list_rv = True, ""
        after = self._backoff(self.failures)
        if failure.retry_after:
            after = max(after, min(failure.retry_after, self.backoff_max))
        return Retry(after, "failed")

    def _recovered(self) -> Recovered:
        op = Recovered(self.failures, self.last_error)
        self.failures, self.last_error, self.error_since, self.feature_off = 0, "", 0.0, ""
        return op

    def _backoff(self, failures: int) -> float:
        return backoff(failures, self.backoff_base, self.backoff_max, self.rng)

    def _is_replay(self, raw: dict[str, Any]) -> bool:
        """An ``ADDED`` of an object we hold at the same uid and RV, on a watch opened at an
        RV: the server ignored that RV (K10.4). A recreated object has a new uid (K4.4)."""
        if not self._since or self.replays:
            return False
        key = object_key(raw, self.kind.namespaced)
        old = self.held(self.kind.name, *key) if key else None
        meta = raw.get("metadata")
        return old is not None and isinstance(meta, dict) and \
            old == (_text(meta.get("uid")), _text(meta.get("resourceVersion")))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
