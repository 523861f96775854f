"""The store: current cluster state, its indexes, and change subscriptions.

Sources write (``replace`` a whole kind, ``upsert``, ``delete``); consumers read and subscribe.
A subscriber is told *which kinds* changed, never what the change was: it reconciles from the
current state (level-triggered), so a missed or repeated notification cannot leave it wrong.
A consumer that wants to reconcile only what changed asks ``changes_since(revision)``: the
keys written since, and the Services whose own object or endpoints they touch; ``None`` when
the bounded journal no longer reaches back that far (then it rebuilds from the whole state).

The store is used from one OS thread (gevent greenlets), so it needs no locks. Indexes (by
Service IP, slices by Service, namespaces, DestinationRules by host) are kept up to date write
by write: one write costs what it changed, never the size of the cluster. ``replace`` diffs the
new state against the old and writes only the difference.

Raw documents are kept only with ``keep_raw`` (the metadata cache needs them), as compact JSON
bytes: a tenth of the memory of the parsed mapping, and never a second copy of every manifest.
"""
from __future__ import annotations

import builtins
import collections
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from edgemesh.meta import istio, kinds
from edgemesh.meta.models import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Namespace,
    Node,
    Pod,
    Service,
    ServicePort,
    TargetRef,
)

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped kinds
Listener = Callable[[frozenset[str]], None]
Raw = dict[str, Any] | bytes | None  # a raw document, as a mapping or as compact JSON
JOURNAL_SIZE = 4096
ENDPOINT_KINDS = ("EndpointSlice", "Endpoints")


@dataclass(frozen=True, slots=True)
class Backend:
    """One endpoint address × one port of a service: what the load balancer chooses among."""
    ip: str
    port: int
    node_name: str = ""
    hostname: str = ""
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    target_ref: TargetRef | None = None
    zone: str = ""


@dataclass(frozen=True)
class RuleMatch:
    """A DestinationRule and how it was matched to a service: ``host`` (Istio) or ``name``."""
    rule: istio.DestinationRule
    by: Literal["host", "name"]


@dataclass
class Changes:
    """What was written since a revision: keys by kind, and the Services they touch (a Service
    itself, or the one an EndpointSlice/Endpoints belongs to, before and after the write)."""
    keys: dict[str, set[Key]] = field(default_factory=dict)
    services: set[Key] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.keys)


class Store:
    """Typed objects by kind and key, their indexes, and (``keep_raw``) their raw documents."""

    def __init__(self, keep_raw: bool = False) -> None:
        self._objects: dict[str, dict[Key, Any]] = {k.name: {} for k in kinds.ALL}
        self._raw: dict[str, dict[Key, bytes]] = {k.name: {} for k in kinds.ALL}
        self.keep_raw = keep_raw
        self._listeners: list[tuple[Listener, frozenset[str] | None]] = []
        self._journal: collections.deque[tuple[int, str, Key, Key | None]] = \
            collections.deque()
        self._journal_floor = 0  # changes_since(r) needs r >= this
        self._by_ip: dict[str, Service] = {}
        # service key -> its slice, or name -> slice when it has several (most have one: a
        # dict each would cost ~230 bytes per Service)
        self._slices: dict[Key, EndpointSlice | dict[str, EndpointSlice]] = {}
        self._ns_services: collections.Counter[str] = collections.Counter()
        self._rules: dict[str, _RuleIndex] = {}  # zone -> index; dropped on any rule change
        self._wildcard_names: dict[tuple[Key, str], bool] = {}  # dropped on Service changes
        self.revision = 0
        self.synced = False  # the first full state has arrived (from any source)
        self.stale_reason = ""  # set while serving from the cache with the API unreachable
        self._logged_by_name: set[tuple[Key, Key]] = set()

    # ---- writing (sources only) ---------------------------------------------------------------

    def replace(self, kind: str, objects: Sequence[tuple[Any, Raw]]) -> bool:
        """Make ``kind`` hold exactly ``objects`` ((typed, raw) pairs); True if anything changed."""
        return self.replace_many({kind: objects})

    def replace_many(self, state: Mapping[str, Sequence[tuple[Any, Raw]]]) -> bool:
        """Replace several kinds at once, notifying subscribers once; only differences are
        written (and journaled)."""
        changed = set()
        self.revision += 1
        for kind, objects in state.items():
            current = self._objects[kind]
            new = {_key(o): (o, r) for o, r in objects}
            for key in [k for k in current if k not in new]:
                self._remove(kind, key)
                changed.add(kind)
            for key, (obj, raw) in new.items():
                if self.keep_raw:
                    self._keep(kind, key, raw)
                if current.get(key) != obj:
                    self._put(kind, key, obj)
                    changed.add(kind)
        if changed:
            self._notify(changed)
        return bool(changed)

    def write_many(self, puts: Iterable[tuple[str, Any, Raw]],
                   deletes: Iterable[tuple[str, Key]] = ()) -> bool:
        """Upsert ``puts`` ((kind, typed, raw)) and delete ``deletes`` ((kind, key)) as one
        change, notifying subscribers once; True if anything changed."""
        changed = set()
        self.revision += 1
        for kind, key in deletes:
            self._raw[kind].pop(key, None)
            if key in self._objects[kind]:
                self._remove(kind, key)
                changed.add(kind)
        for kind, obj, raw in puts:
            key = _key(obj)
            if self.keep_raw:
                self._keep(kind, key, raw)
            if self._objects[kind].get(key) != obj:
                self._put(kind, key, obj)
                changed.add(kind)
        if changed:
            self._notify(changed)
        return bool(changed)

    def upsert(self, kind: str, obj: Any, raw: Raw) -> bool:
        key = _key(obj)
        if self.keep_raw:
            self._keep(kind, key, raw)
        if self._objects[kind].get(key) == obj:
            return False
        self.revision += 1
        self._put(kind, key, obj)
        self._notify({kind})
        return True

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        key = (namespace, name)
        self._raw[kind].pop(key, None)
        if key not in self._objects[kind]:
            return False
        self.revision += 1
        self._remove(kind, key)
        self._notify({kind})
        return True

    def mark_synced(self, stale_reason: str = "") -> None:
        changed = not self.synced or self.stale_reason != stale_reason
        self.synced = True
        self.stale_reason = stale_reason
        if changed:
            self.revision += 1
            self._notify(set())

    def _keep(self, kind: str, key: Key, raw: Raw) -> None:
        if raw is not None:
            self._raw[kind][key] = raw if isinstance(raw, bytes) else raw_json(raw)

    def _put(self, kind: str, key: Key, obj: Any) -> None:
        old = self._objects[kind].get(key)
        if old is not None:
            self._unindex(kind, key, old)
        self._objects[kind][key] = obj
        self._index(kind, key, obj)
        self._journal_add(kind, key, old, obj)

    def _remove(self, kind: str, key: Key) -> None:
        old = self._objects[kind].pop(key)
        self._raw[kind].pop(key, None)
        self._unindex(kind, key, old)
        self._journal_add(kind, key, old, None)

    def _index(self, kind: str, key: Key, obj: Any) -> None:
        if kind == "Service":
            for ip in _service_ips(obj):
                self._by_ip[ip] = obj
            self._ns_services[key[0]] += 1
            self._wildcard_names.clear()
        elif kind == "EndpointSlice" and obj.service_name:
            skey = (key[0], obj.service_name)
            known = self._slices.get(skey)
            if known is None or (isinstance(known, EndpointSlice) and
                                 known.meta.name == key[1]):
                self._slices[skey] = obj
            elif isinstance(known, EndpointSlice):
                self._slices[skey] = {known.meta.name: known, key[1]: obj}
            else:
                known[key[1]] = obj
        elif kind == "DestinationRule":
            self._rules.clear()

    def _unindex(self, kind: str, key: Key, old: Any) -> None:
        if kind == "Service":
            for ip in _service_ips(old):
                if self._by_ip.get(ip) is old:
                    del self._by_ip[ip]
            self._ns_services[key[0]] -= 1
            if self._ns_services[key[0]] <= 0:
                del self._ns_services[key[0]]
            self._wildcard_names.clear()
        elif kind == "EndpointSlice" and old.service_name:
            skey = (key[0], old.service_name)
            slices = self._slices.get(skey)
            if isinstance(slices, EndpointSlice):
                if slices.meta.name == key[1]:
                    del self._slices[skey]
            elif slices is not None:
                slices.pop(key[1], None)
                if len(slices) == 1:
                    self._slices[skey] = next(iter(slices.values()))
        elif kind == "DestinationRule":
            self._rules.clear()

    def _journal_add(self, kind: str, key: Key, old: Any, new: Any) -> None:
        journal = self._journal
        for obj in (old, new) if old is not None and new is not None else (old or new,):
            service = _service_of(kind, key, obj)
            if len(journal) >= JOURNAL_SIZE:
                self._journal_floor = journal.popleft()[0]
            journal.append((self.revision, kind, key, service))

    def changes_since(self, revision: int) -> Changes | None:
        """Everything written after ``revision``; None if the journal no longer reaches back."""
        if revision < self._journal_floor:
            return None
        out = Changes()
        for rev, kind, key, service in reversed(self._journal):
            if rev <= revision:
                break
            out.keys.setdefault(kind, set()).add(key)
            if service is not None:
                out.services.add(service)
        return out

    def _notify(self, changed: set[str]) -> None:
        frozen = frozenset(changed)
        for listener, wanted in list(self._listeners):
            if wanted is None or not wanted.isdisjoint(frozen) or not frozen:
                try:
                    listener(frozen)
                except Exception:  # a consumer's bug must not break a source
                    log.exception("store listener %r failed", listener)

    # ---- subscribing --------------------------------------------------------------------------

    def subscribe(self, listener: Listener, kinds_: Iterable[str] | None = None) -> None:
        """Call ``listener(changed_kinds)`` after every change to ``kinds_`` (all if None).

        Listeners must be quick (set an event, wake a reconciler); the empty set means the
        sync state changed.
        """
        self._listeners.append((listener, frozenset(kinds_) if kinds_ is not None else None))

    def unsubscribe(self, listener: Listener) -> None:
        # == rather than `is`: a bound method (reconciler.wake) is a new object at each access
        self._listeners = [(cb, k) for cb, k in self._listeners if cb != listener]

    # ---- reading ------------------------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> Any | None:
        return self._objects[kind].get((namespace, name))

    def list(self, kind: str) -> Iterator[Any]:
        return iter(list(self._objects[kind].values()))

    def count(self, kind: str) -> int:
        return len(self._objects[kind])

    def raw_snapshot(self) -> dict[str, builtins.list[dict[str, Any]]]:
        """Every raw document by kind (``keep_raw`` only)."""
        return {kind: [json.loads(d) for d in docs.values()]
                for kind, docs in self._raw.items() if docs}

    def raw_json(self) -> dict[str, builtins.list[bytes]]:
        """Every raw document by kind as compact JSON: what the cache writes, without
        decoding and encoding again (``keep_raw`` only)."""
        return {kind: list(docs.values()) for kind, docs in self._raw.items() if docs}

    def raw(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The raw document of one object (``keep_raw`` only)."""
        doc = self._raw[kind].get((namespace, name))
        return json.loads(doc) if doc is not None else None

    def service(self, namespace: str, name: str) -> Service | None:
        return self._objects["Service"].get((namespace, name))

    def services(self) -> builtins.list[Service]:
        return list(self._objects["Service"].values())

    def service_by_ip(self, ip: str) -> Service | None:
        return self._by_ip.get(ip)

    def node(self, name: str) -> Node | None:
        return self._objects["Node"].get(("", name))

    def pods(self) -> builtins.list[Pod]:
        return list(self._objects["Pod"].values())

    def namespaces(self) -> set[str]:
        """Every namespace that exists: a Namespace object, or (clusters we cannot list
        namespaces from) the namespace of a Service."""
        return {*(ns.meta.name for ns in self._objects["Namespace"].values()
                  if isinstance(ns, Namespace)), *self._ns_services}

    def slices_for(self, service: Service) -> builtins.list[EndpointSlice]:
        """EndpointSlices of a service; its core/v1 Endpoints only when it has no slices."""
        slices = self._slices.get(service.key)
        if isinstance(slices, EndpointSlice):
            return [slices]
        if slices:
            return [slices[name] for name in sorted(slices)]
        legacy = self._objects["Endpoints"].get(service.key)
        return [legacy] if legacy else []

    def backends(self, service: Service, port: ServicePort, *,
                 include_not_ready: bool = False) -> builtins.list[Backend]:
        """Endpoints of one service port: ready ones (all with ``include_not_ready``).

        When none is ready, endpoints that are serving while terminating are returned, the
        graceful-termination fallback kube-proxy uses. Duplicates across slices are merged;
        the same Pod IP on two nodes is two endpoints (edge sites reuse Pod ranges).
        """
        seen: dict[tuple[str, int, str], Backend] = {}
        for sl in self.slices_for(service):
            slice_number = _port_number(sl.ports, port)
            for ep in sl.endpoints:
                number = slice_number if ep.ports is None else _port_number(ep.ports, port)
                if number is None:
                    continue
                ready = ep.ready or service.publish_not_ready
                for ip in ep.addresses:
                    b = _backend(ep, ip, number, ready)
                    key = (ip, number, b.node_name)
                    if key not in seen or (ready and not seen[key].ready):
                        seen[key] = b
        found = sorted(seen.values(), key=lambda b: (b.ip, b.port, b.node_name))
        if include_not_ready:
            return found
        usable = [b for b in found if b.ready]
        return usable or [b for b in found if b.serving and b.terminating]

    def destination_rule_for(self, service: Service, zone: str = "cluster.local"
                             ) -> istio.DestinationRule | None:
        """The DestinationRule that applies to ``service`` (see ``destination_rule_match``)."""
        match = self.destination_rule_match(service, zone)
        return match.rule if match is not None else None

    def destination_rule_match(self, service: Service, zone: str = "cluster.local"
                               ) -> RuleMatch | None:
        """The DestinationRule for ``service`` and how it was matched.

        First as Istio resolves ``spec.host``: a short host is relative to the rule's
        namespace; ``name.ns``, ``name.ns.svc`` and the FQDN name the service wherever the rule
        lives; ``*.suffix`` wildcards (never expanded) match by suffix and ``*`` matches
        everything. A rule in the service's own namespace wins over one elsewhere, then an
        exact host over a wildcard, then the longer wildcard; ties go to the first
        (namespace, name) in sort order, so the choice is stable.

        When no rule's host names the service, the rule with the service's own name in its
        namespace applies — how the Go EdgeMesh matched rules, whose examples give ``host`` a
        Deployment's name — unless that rule's host names another Service (then it is that
        Service's rule, as Istio reads it). Logged once per service and rule.
        """
        name, ns = service.meta.name, service.meta.namespace
        fqdn = f"{name}.{ns}.svc.{zone}"
        index = self._rules.get(zone)
        if index is None:
            index = self._rules[zone] = _RuleIndex(self._objects["DestinationRule"], zone)
        best: tuple[int, int, int, Key] | None = None
        chosen = None
        for key, dr in (*index.exact.get(fqdn, ()), *index.wildcards):
            if not _host_matches(dr, fqdn, zone):
                continue
            wildcard = dr.host.startswith("*")
            rank = (0 if dr.meta.namespace == ns else 1, int(wildcard),
                    -len(dr.host.rstrip(".")), key)
            if best is None or rank < best:
                best, chosen = rank, dr
        if chosen is not None:
            return RuleMatch(chosen, "host")
        named = self._objects["DestinationRule"].get((ns, name))
        if named is None or self._names_a_service(named, zone):
            return None
        if (service.key, (ns, name)) not in self._logged_by_name:
            self._logged_by_name.add((service.key, (ns, name)))
            log.info("DestinationRule %s/%s applies to Service %s/%s by its name, as the Go "
                     "EdgeMesh matched rules (its host %r names no Service; set host: %s to "
                     "match it the Istio way)", ns, name, ns, name, named.host, name)
        return RuleMatch(named, "name")

    def _names_a_service(self, dr: istio.DestinationRule, zone: str) -> bool:
        host = dr.host.rstrip(".").lower()
        if not host.startswith("*"):
            fqdn = _expand_host(host, dr.meta.namespace, zone)
            parts = fqdn.removesuffix(f".svc.{zone}").split(".")
            return len(parts) == 2 and (parts[1], parts[0]) in self._objects["Service"]
        key = (_key(dr), zone)
        known = self._wildcard_names.get(key)
        if known is None:  # computed once per wildcard rule until Services change
            suffix = f".svc.{zone}"
            known = self._wildcard_names[key] = any(
                _host_matches(dr, f"{s_name}.{s_ns}{suffix}", zone)
                for s_ns, s_name in self._objects["Service"])
        return known


class _RuleIndex:
    """DestinationRules of one zone: by the FQDN their exact host names, and the wildcards."""

    def __init__(self, rules: dict[Key, istio.DestinationRule], zone: str) -> None:
        self.exact: dict[str, list[tuple[Key, istio.DestinationRule]]] = {}
        self.wildcards: list[tuple[Key, istio.DestinationRule]] = []
        for key, dr in rules.items():
            host = dr.host.rstrip(".").lower()
            if host.startswith("*"):
                self.wildcards.append((key, dr))
            else:
                self.exact.setdefault(_expand_host(host, dr.meta.namespace, zone), []
                                      ).append((key, dr))


def _service_ips(svc: Service) -> Iterator[str]:
    for ip in (*svc.cluster_ips, *svc.external_ips):
        if ip and ip != "None":
            yield ip


def _service_of(kind: str, key: Key, obj: Any) -> Key | None:
    """The Service an object's change touches (for ``Changes.services``)."""
    if kind == "Service" or kind == "Endpoints":
        return key
    if kind == "EndpointSlice":
        return (key[0], obj.service_name) if obj.service_name else None
    return None


def raw_json(raw: dict[str, Any]) -> bytes:
    """A raw document as the store keeps it (compact JSON); sources may pass this instead."""
    return json.dumps(raw, separators=(",", ":")).encode()


def _key(obj: Any) -> Key:
    return (obj.meta.namespace, obj.meta.name)


def _host_matches(dr: istio.DestinationRule, fqdn: str, zone: str) -> bool:
    host = dr.host.rstrip(".").lower()
    if host.startswith("*"):
        return host == "*" or fqdn.endswith(host[1:])
    return _expand_host(host, dr.meta.namespace, zone) == fqdn


def _expand_host(host: str, namespace: str, zone: str) -> str:
    parts = host.split(".")
    if host.endswith("." + zone) or host == "*":
        return host
    if len(parts) == 1:
        return f"{host}.{namespace}.svc.{zone}"
    if len(parts) == 2:
        return f"{host}.svc.{zone}"
    if len(parts) == 3 and parts[2] == "svc":
        return f"{host}.{zone}"
    return host


def _port_number(ports: tuple[EndpointPort, ...], port: ServicePort) -> int | None:
    """The target port number endpoint ports give for a service port (matched by name)."""
    if not ports:
        # Endpoints without ports (selector-less, hand-made): a numeric targetPort still works.
        return port.target_port if isinstance(port.target_port, int) else None
    for p in ports:
        if p.name == port.name and (p.protocol or "TCP") == port.protocol:
            return p.port
    return None


def _backend(ep: Endpoint, ip: str, port: int, ready: bool) -> Backend:
    return Backend(ip=ip, port=port, node_name=ep.node_name, hostname=ep.hostname, ready=ready,
                   serving=ep.serving, terminating=ep.terminating, target_ref=ep.target_ref,
                   zone=ep.zone)
