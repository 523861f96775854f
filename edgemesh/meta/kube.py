"""The ``kube`` metadata source: list+watch of every kind EdgeMesh reads, from kube-apiserver or
the KubeEdge metaServer, written into the store.

Follows docs/specs/watch.md (rule numbers ``Kx``). One greenlet per kind, each with
its own resourceVersion (K7). What to ask and what an answer means is decided without I/O by
``edgemesh.meta.watch.KindMachine`` (paged lists from ``resourceVersion=0``, watches from the
last RV, bookmarks, 410 → relist, backoff, three failures or a 504 → relist, replaying
metaServers, the EndpointSlice → Endpoints fallback, optional kinds "feature off"); this module
is the loop around it: ask the machine, do the HTTP, apply the store ops it returns, log, count
and sleep as long as it says.

Secrets (the gateway's TLS credentials) are watched per namespace, only where Gateways need
them: ``edgemesh.meta.secrets.SecretWatches`` starts and stops those loops.

The store is marked synced once Service, EndpointSlice (or Endpoints) and Namespace have each
listed once (Pods are not watched: nothing reads them from an API source). If a first list
fails and ``state_dir`` holds a metadata cache, the cache fills the store and ``/readyz`` stays
200, its line ``[+] apiserver (serving cached metadata: API unreachable since ...) ok``: the
agent can serve, so a readiness probe should keep sending traffic, and the note says what it is
serving. The first full live sync clears it.
"""
from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gevent
import requests
import urllib3

from edgemesh.errors import ManifestError, RemoteProtocolError
from edgemesh.meta import kinds
from edgemesh.meta.cache import MetadataCache
from edgemesh.meta.kinds import Kind
from edgemesh.meta.kubeconn import Connection, connection_from_config
from edgemesh.meta.kubewire import (
    ApiError,
    Expired,
    LineSplitter,
    ListPage,
    WatchEvent,
    decode_event,
    list_page,
    object_key,
    retry_after_seconds,
    status_error,
)
from edgemesh.meta.secrets import (
    SECRET,
    SecretNamespaces,
    SecretWatches,
    credential_namespaces,
    replace_in_namespace,
)
from edgemesh.meta.store import Store, raw_json
from edgemesh.meta.watch import (
    BACKOFF_BASE,
    PAGE_SIZE,
    Clear,
    Commit,
    Delete,
    Failure,
    KindMachine,
    ListRequest,
    Recovered,
    Refused,
    ReplayDetected,
    Stage,
    StoreOp,
    Upsert,
    WatchRequest,
    backoff,
    iso,
)
from edgemesh.runtime import metrics, tasks
from edgemesh.runtime.admin import Admin
from edgemesh.runtime.logs import Once

__all__ = ["KubeSource", "connection_from_config", "Connection"]

log = logging.getLogger(__name__)

RESTARTS = metrics.counter("edgemesh_meta_watch_restarts_total",
                           "Watches re-opened, by kind and reason.", ["kind", "reason"])
RELISTS = metrics.counter("edgemesh_meta_relists_total", "Full lists, by kind.", ["kind"])
EVENTS = metrics.counter("edgemesh_meta_events_total", "Watch events received.",
                         ["kind", "type"])
BAD_OBJECTS = metrics.counter("edgemesh_meta_bad_objects_total",
                              "Objects from the API that failed to parse (skipped).", ["kind"])

# Pods are not watched: no consumer reads them from an API source (the files source uses them to
# derive endpoints, the API has its EndpointSlices), and a cluster's Pods outnumber its Services
# several times over in list time and memory.
REQUIRED = ("Service", "EndpointSlice", "Namespace")
OPTIONAL = ("Node", "DestinationRule", "Gateway", "VirtualService")
CONNECT_TIMEOUT = 5.0
LIST_READ_TIMEOUT = 60.0
DOWN_REMINDER_SECONDS = 60.0
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    requests.RequestException, urllib3.exceptions.HTTPError, OSError)


RETRYABLE: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, ApiError, RemoteProtocolError)
LOOP_ERRORS: tuple[type[BaseException], ...] = (Expired, Refused, *RETRYABLE)  # _run handles
STREAM_BROKEN: tuple[type[BaseException], ...] = (
    urllib3.exceptions.ProtocolError, requests.exceptions.ChunkedEncodingError)


KindState = KindMachine  # one kind's list+watch bookkeeping, as tests and views name it


@dataclass
class _Staged:
    """A list's parsed pages until its ``Commit``; malformed items by key (keep last good)."""
    pairs: list[tuple[Any, Any]] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)


class KubeSource:
    """List+watch into ``store``; ``start()`` spawns the loops, ``stop()`` ends them."""

    def __init__(self, store: Store, conn: Connection, *, state_dir: str = "",
                 admin: Admin | None = None, backoff_max: float = 30.0,
                 secrets: bool = False, optional_retry: float = 60.0,
                 only: tuple[str, ...] = (),
                 secret_namespaces: SecretNamespaces | None = None) -> None:
        """``secrets``: also watch Secrets (the gateway's TLS), per namespace, in the namespaces
        ``secret_namespaces(gateways)`` returns (default ``credential_namespaces``: the
        namespaces of Gateways with a ``tls.credentialName``); ``only``: watch just these kinds
        (a peer that cannot serve the rest; readiness then waits for these only)."""
        self.store = store
        self.conn = conn
        self.admin = admin
        self.backoff_max = max(backoff_max, 0.01)
        self.backoff_base = min(BACKOFF_BASE, self.backoff_max)
        self.optional_retry = optional_retry
        self.cache = MetadataCache(store, state_dir, source=conn.base_url) if state_dir else None
        slots = [*REQUIRED, *OPTIONAL]
        slots = [s for s in slots if s in only] if only else slots
        self.states = {s: self._machine(s, kinds.BY_NAME[s], s in REQUIRED) for s in slots}
        self._sessions = {s: conn.session() for s in slots}
        self._greenlets: list[gevent.Greenlet] = []
        self.secrets = SecretWatches(
            store, secret_namespaces or credential_namespaces, conn.session,
            lambda ns: self._machine(SECRET, kinds.SECRET, False, ns), self._run) \
            if secrets and (not only or SECRET in only) else None
        self._cache_tried = False
        self._cache_kinds: set[str] = set()
        self._once = Once()
        self._api_down_since = 0.0
        self._down_warned = 0.0

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.admin is not None:
            self.admin.add_check("apiserver", self._readiness, note=self._stale_note)
            self.admin.add_view("meta", self.view)
        if self.cache is not None:
            self.cache.start()
        for slot, st in self.states.items():
            self._greenlets.append(tasks.spawn_forever(f"kube-{slot}",
                                                       functools.partial(self._run, st),
                                                       backoff=5.0))
        if self.secrets is not None:
            self.secrets.start()

    def stop(self) -> None:
        if self.secrets is not None:
            self.secrets.stop_reconciling()
        gevent.killall(self._greenlets, timeout=2)
        self._greenlets.clear()
        if self.secrets is not None:
            self.secrets.stop_loops()
        if self.cache is not None:
            self.cache.stop()
        for s in self._sessions.values():
            s.close()

    # ---- admin --------------------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        return {"server": self.conn.base_url, "synced": self.store.synced,
                "stale": self.store.stale_reason,
                "kinds": {slot: st.view() for slot, st in self.states.items()},
                "secretNamespaces": {ns: st.view() for ns, st in sorted(
                    self.secret_states.items())},
                "cache": self.cache.view() if self.cache else None}

    def _readiness(self) -> str:
        if self.store.synced:
            return ""
        failing = [st for st in self.states.values() if st.required and st.last_error]
        if failing:
            st = failing[0]
            return (f"{self.conn.base_url} failing since {iso(st.error_since)}: "
                    f"{st.last_error}; retrying")
        waiting = [s for s, st in self.states.items() if st.required and not st.listed]
        return "listing " + ", ".join(waiting)

    def _stale_note(self) -> str:
        """/readyz stays 200 while the cache is served; the check's line says so."""
        return self.store.stale_reason

    @property
    def secret_states(self) -> dict[str, KindState]:
        """The Secret loops' machines, by namespace."""
        return self.secrets.states if self.secrets is not None else {}

    # ---- the store ----------------------------------------------------------------------------

    def _replace(self, st: KindState, pairs: Sequence[tuple[Any, Any]]) -> None:
        if st.namespace:
            replace_in_namespace(self.store, st.kind.name, st.namespace, pairs)
        else:
            self.store.replace(st.kind.name, pairs)

    # ---- the loop: ask the machine, do the I/O, apply its ops, sleep -------------------------

    def _machine(self, slot: str, kind: Kind, required: bool, namespace: str = "") -> KindState:
        return KindMachine(slot, kind, required, namespace, backoff_max=self.backoff_max,
                           optional_retry=self.optional_retry, page_size=PAGE_SIZE,
                           held=self._held)

    def _held(self, kind: str, ns: str, name: str) -> tuple[str, str] | None:
        old = self.store.get(kind, ns, name)
        return None if old is None else (old.meta.uid, old.meta.resource_version)

    def _run(self, st: KindState) -> None:
        staged = _Staged()
        while True:
            req = st.next_request()
            try:
                if isinstance(req, ListRequest):
                    if not req.continue_token:
                        staged = _Staged()
                    self._apply(st, st.on_page(self._list_page(st, req)), staged)
                else:
                    self._watch(st, req, staged)
            except LOOP_ERRORS as e:
                self._failed(st, e, staged)

    def _failed(self, st: KindState, e: BaseException, staged: _Staged) -> None:
        text = _describe(e)
        retry = st.on_failure(Failure.of(e, text), time.time())
        inner = e.error if isinstance(e, Refused) else e
        if retry.why == "expired":
            RESTARTS.labels(st.kind.name, "expired").inc()
            log.info("%s: resourceVersion expired (%s); relisting", st.what, e)
        elif retry.why == "fallback":
            log.warning("EndpointSlices not served or not allowed (%s); using core/v1 Endpoints",
                        retry.reason)
        elif retry.why == "feature_off" and retry.report:
            if st.namespace:
                log.warning("%s: not readable (%s): grant the gateway Secret access in "
                            "namespace %s (a RoleBinding, see build/gateway/README.md); "
                            "retrying every %.0fs", st.what, retry.reason, st.namespace,
                            self.optional_retry)
            else:
                log.info("%s: feature off (%s); retrying every %.0fs", st.what, retry.reason,
                         self.optional_retry)
        elif retry.why == "failed":
            RESTARTS.labels(st.kind.name, _reason(inner)).inc()
            self._log_failure(st, inner, text)
            if not st.listed and st.required:
                self._first_list_failed(inner)
        self._apply(st, retry.ops, staged)
        if retry.after:
            gevent.sleep(retry.after)

    def _apply(self, st: KindState, ops: Sequence[StoreOp], staged: _Staged) -> None:
        for op in ops:
            if isinstance(op, Stage):
                self._parse_items(st, op.items, staged.pairs, staged.bad)
            elif isinstance(op, Commit):
                RELISTS.labels(op.kind).inc()
                self._apply_parsed(st, staged.pairs, staged.bad)
                staged.pairs, staged.bad = [], []
                log.debug("%s: listed %d objects at rv %r", st.what, op.count, st.rv)
                self._check_synced()
            elif isinstance(op, Upsert):
                obj = self._parse(st.kind, op.raw)
                if obj is not None:
                    self.store.upsert(op.kind, obj, op.raw)
            elif isinstance(op, Delete):
                self.store.delete(op.kind, op.namespace, op.name)
            elif isinstance(op, Clear):
                if op.namespace:
                    replace_in_namespace(self.store, op.kind, op.namespace, [])
                else:
                    self.store.replace(op.kind, [])
            elif isinstance(op, Recovered):
                self._recovered(st, op)
            elif isinstance(op, ReplayDetected):
                log.info("%s: the server replays objects on every watch (metaServer-like); "
                         "relisting on each reconnect", st.what)

    def _log_failure(self, st: KindState, e: BaseException, text: str) -> None:
        """One warning when the API becomes unreachable (not one per kind), a reminder each
        minute while it stays so; errors of one kind (403, 500, ...) are that kind's."""
        if isinstance(e, (ApiError, RemoteProtocolError)):
            if st.failures == 1:
                log.warning("%s: list+watch from %s failed: %s; retrying with backoff",
                            st.what, self.conn.base_url, text)
            return
        now = time.monotonic()
        if not self._api_down_since:
            self._api_down_since, self._down_warned = now, now
            log.warning("API server %s unreachable: %s; retrying with backoff (at most %.0fs)",
                        self.conn.base_url, text, self.backoff_max)
        elif now - self._down_warned >= DOWN_REMINDER_SECONDS:
            self._down_warned = now
            log.warning("API server %s still unreachable after %.0fs: %s; retrying",
                        self.conn.base_url, now - self._api_down_since, text)
        else:
            log.debug("%s: still failing (%d): %s", st.what, st.failures, text)

    def _recovered(self, st: KindState, op: Recovered) -> None:
        if self._api_down_since:
            log.warning("API server %s reachable again after %.0fs", self.conn.base_url,
                        time.monotonic() - self._api_down_since)
            self._api_down_since = 0.0
        elif op.last_error:
            log.info("%s: list+watch works again (after %d failures)", st.what, op.failures)

    def _backoff(self, failures: int) -> float:
        return backoff(failures, self.backoff_base, self.backoff_max, random)

    # ---- list ---------------------------------------------------------------------------------

    def _list_page(self, st: KindState, req: ListRequest) -> ListPage:
        # Each page is parsed as it arrives and its documents dropped (kept as compact JSON
        # only for the cache): a 10,000-object list never holds every raw mapping at once.
        with self._get(st, req.params, (CONNECT_TIMEOUT, LIST_READ_TIMEOUT), stream=False) as r:
            return list_page(r.content)

    def _parse_items(self, st: KindState, items: list[Any], pairs: list[tuple[Any, Any]],
                     bad: list[tuple[str, str]]) -> None:
        keep = self.store.keep_raw
        for raw in items:
            obj = self._parse(st.kind, raw)
            if obj is not None:
                pairs.append((obj, raw_json(raw) if keep else None))
            elif isinstance(raw, dict) and (key := object_key(raw, st.kind.namespaced)):
                bad.append(key)

    def _apply_parsed(self, st: KindState, pairs: list[tuple[Any, Any]],
                      bad: list[tuple[str, str]]) -> None:
        name = st.kind.name
        for key in bad:
            old = self.store.get(name, *key)
            if old is not None:
                pairs.append((old, self.store.raw(name, *key)))
        self._replace(st, pairs)

    def _parse(self, kind: Kind, raw: Any) -> Any | None:
        if isinstance(raw, dict) and isinstance(raw.get("metadata"), dict) and \
                "managedFields" in raw["metadata"]:
            # Server-side-apply bookkeeping: often the bulk of an object, never read.
            raw["metadata"] = {k: v for k, v in raw["metadata"].items() if k != "managedFields"}
        try:
            return kind.parse(raw)
        except (ManifestError, TypeError, ValueError, AttributeError, KeyError) as e:
            BAD_OBJECTS.labels(kind.name).inc()
            key = object_key(raw, kind.namespaced) if isinstance(raw, dict) else None
            if self._once((kind.name, key, str(e))):
                log.warning("%s %s: skipped malformed object: %s", kind.name,
                            "/".join(k for k in key if k) if key else "(unnamed)", e)
            return None

    # ---- watch --------------------------------------------------------------------------------

    def _watch(self, st: KindState, req: WatchRequest, staged: _Staged) -> None:
        started, events = time.monotonic(), 0
        dropped = False
        with self._get(st, req.params, (CONNECT_TIMEOUT, req.timeout + 30), stream=True) as r:
            splitter = LineSplitter()
            try:
                while data := r.raw.read1(65536):
                    for line in splitter.feed(data):
                        self._event(st, decode_event(line), staged)
                        events += 1
            except STREAM_BROKEN:
                dropped = True  # K6.3: the connection closed under us; an unfinished event
                # in the splitter is discarded, and the re-watch from the last RV resends it
        dropped = dropped or splitter.pending > 0
        st.on_watch_end(events, time.monotonic() - started, dropped)
        RESTARTS.labels(st.kind.name, "dropped" if dropped else "eof").inc()
        log.debug("%s: watch %s after %d events; re-watching from rv %r", st.what,
                  "dropped" if dropped else "ended", events, st.rv)

    def _event(self, st: KindState, ev: WatchEvent, staged: _Staged) -> None:
        EVENTS.labels(st.kind.name, ev.type).inc()
        if ev.type != "ERROR" and log.isEnabledFor(logging.DEBUG):  # per-object at -v 3 and up
            log.debug("%s: %s %s", st.what, ev.type, "/".join(
                k for k in (object_key(ev.object, st.kind.namespaced) or ()) if k))
        self._apply(st, st.on_event(ev), staged)

    def _get(self, st: KindState, params: dict[str, str], timeout: tuple[float, float],
             stream: bool) -> requests.Response:
        session = self.secrets.session(st.namespace) if self.secrets and st.namespace else \
            self._sessions[st.slot]
        r = session.get(self.conn.url(st.path), params=params, headers=self.conn.headers(),
                        timeout=timeout, stream=stream, allow_redirects=False)
        if r.status_code == 200:
            return r
        try:
            body = r.json() if len(r.content) < 1 << 20 else {}
        except ValueError:
            body = {}
        r.close()
        status = body if isinstance(body, dict) else {}
        error = status_error(status, r.status_code, retry_after_seconds(
            r.headers.get("Retry-After")))
        raise Refused(r.status_code, error)

    # ---- sync and the cache -------------------------------------------------------------------

    def _check_synced(self) -> None:
        if not all(st.listed for st in self.states.values() if st.required):
            return
        if self.store.synced and not self.store.stale_reason:
            return
        if self.store.stale_reason:
            log.warning("API server %s answers again: serving live metadata", self.conn.base_url)
            watched = {st.kind.name for st in self.states.values()} | \
                ({SECRET} if self.secrets is not None else set())
            self.store.replace_many({k: [] for k in self._cache_kinds - watched})
        first = not self.store.synced
        self.store.mark_synced("")
        if first:
            log.info("metadata synced from %s: %s", self.conn.base_url, ", ".join(
                f"{self.store.count(k):,} {k}" for k in (*REQUIRED, *OPTIONAL)
                if self.store.count(k)) or "no objects")
        if self.cache is not None:
            self.cache.loaded(False)

    def _first_list_failed(self, error: BaseException) -> None:
        if self._cache_tried or self.store.synced:
            return
        self._cache_tried = True
        since = iso(time.time())
        if self.cache is None:
            log.warning("API server %s unreachable (%s) and no state dir for a metadata cache; "
                        "not ready until it answers", self.conn.base_url, _describe(error))
            return
        state = self.cache.load()
        if not state:
            log.warning("API server %s unreachable (%s) and no usable metadata cache in %s; "
                        "not ready until it answers", self.conn.base_url, _describe(error),
                        self.cache.path)
            return
        live = {st.kind.name for st in self.states.values() if st.listed}
        state = {k: v for k, v in state.items() if k not in live}
        self._cache_kinds = set(state)
        self.store.replace_many(state)
        reason = f"serving cached metadata: API unreachable since {since}"
        self.store.mark_synced(reason)
        self.cache.loaded(True)
        log.warning("%s (%d objects from %s, written %s)", reason,
                    sum(len(v) for v in state.values()), self.cache.path, self.cache.written_at)


def _reason(e: BaseException) -> str:
    if isinstance(e, ApiError):
        return f"http_{e.code}" if e.code else "error"
    if isinstance(e, RemoteProtocolError):
        return "protocol"
    if isinstance(e, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
        return "timeout"
    return "connection"


def _describe(e: BaseException) -> str:
    if isinstance(e, urllib3.exceptions.ProtocolError) and e.args:
        return str(e.args[0])
    if isinstance(e, requests.ConnectionError) and e.args:
        inner = e.args[0]
        text = str(getattr(inner, "reason", None) or inner)
        # urllib3 prefixes "HTTPConnection(host='127.0.0.1', port=1): " or "<... object>: "
        return text.split("): ", 1)[-1] if text.startswith("HTTP") else \
            text.split(">: ", 1)[-1] if text.startswith("<") else text
    return str(e) or type(e).__name__
