"""The store: current cluster state, its indexes, and change subscriptions.

Sources write (``replace`` a whole kind, ``upsert``, ``delete``); consumers read and subscribe.
A subscriber is told *which kinds* changed, never what the change was: it reconciles from the
current state (level-triggered), so a missed or repeated notification cannot leave it wrong.

The store is used from one OS thread (gevent greenlets), so it needs no locks. Indexes are
rebuilt lazily on first read after a change to a kind they depend on.
"""
from __future__ import annotations

import builtins
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
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


class Store:
    """Typed objects by kind and key, plus the raw documents they came from (for the cache)."""

    def __init__(self) -> None:
        self._objects: dict[str, dict[Key, Any]] = {k.name: {} for k in kinds.ALL}
        self._raw: dict[str, dict[Key, dict[str, Any]]] = {k.name: {} for k in kinds.ALL}
        self._listeners: list[tuple[Listener, frozenset[str] | None]] = []
        self._index: dict[str, Any] = {}
        self.revision = 0
        self.synced = False  # the first full state has arrived (from any source)
        self.stale_reason = ""  # set while serving from the cache with the API unreachable
        self._logged_by_name: set[tuple[Key, Key]] = set()

    # ---- writing (sources only) ---------------------------------------------------------------

    def replace(self, kind: str, objects: list[tuple[Any, dict[str, Any]]]) -> bool:
        """Make ``kind`` hold exactly ``objects`` ((typed, raw) pairs); True if anything changed."""
        return self.replace_many({kind: objects})

    def replace_many(self, state: dict[str, list[tuple[Any, dict[str, Any]]]]) -> bool:
        """Replace several kinds at once, notifying subscribers once."""
        changed = set()
        for kind, objects in state.items():
            new = {_key(o): o for o, _ in objects}
            self._raw[kind] = {_key(o): r for o, r in objects}
            if new != self._objects[kind]:
                self._objects[kind] = new
                changed.add(kind)
        if changed:
            self._changed(changed)
        return bool(changed)

    def upsert(self, kind: str, obj: Any, raw: dict[str, Any]) -> bool:
        key = _key(obj)
        self._raw[kind][key] = raw
        if self._objects[kind].get(key) == obj:
            return False
        self._objects[kind][key] = obj
        self._changed({kind})
        return True

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        key = (namespace, name)
        self._raw[kind].pop(key, None)
        if self._objects[kind].pop(key, None) is None:
            return False
        self._changed({kind})
        return True

    def mark_synced(self, stale_reason: str = "") -> None:
        changed = not self.synced or self.stale_reason != stale_reason
        self.synced = True
        self.stale_reason = stale_reason
        if changed:
            self._changed(set())

    def _changed(self, changed: set[str]) -> None:
        self.revision += 1
        for name in list(self._index):
            if not changed.isdisjoint(_INDEX_DEPENDS[name]):
                del self._index[name]
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
        """Every raw document by kind: what the cache writes."""
        return {kind: list(docs.values()) for kind, docs in self._raw.items() if docs}

    def service(self, namespace: str, name: str) -> Service | None:
        return self._objects["Service"].get((namespace, name))

    def services(self) -> builtins.list[Service]:
        return list(self._objects["Service"].values())

    def service_by_ip(self, ip: str) -> Service | None:
        index = self._cached("service_by_ip", lambda: {
            ip_: s for s in self._objects["Service"].values() for ip_ in
            (*s.cluster_ips, *s.external_ips) if ip_ and ip_ != "None"})
        return index.get(ip)

    def node(self, name: str) -> Node | None:
        return self._objects["Node"].get(("", name))

    def pods(self) -> builtins.list[Pod]:
        return list(self._objects["Pod"].values())

    def namespace_exists(self, namespace: str) -> bool:
        """A namespace object exists, or (clusters we cannot list namespaces from) a service."""
        names = self._cached("namespaces", lambda: {
            *(ns.meta.name for ns in self._objects["Namespace"].values()
              if isinstance(ns, Namespace)),
            *(s.meta.namespace for s in self._objects["Service"].values())})
        return namespace in names

    def slices_for(self, service: Service) -> builtins.list[EndpointSlice]:
        """EndpointSlices of a service; its core/v1 Endpoints only when it has no slices."""
        by_service = self._cached("slices", self._slices_by_service)
        slices = by_service.get(service.key)
        if slices:
            return slices
        legacy = self._objects["Endpoints"].get(service.key)
        return [legacy] if legacy else []

    def backends(self, service: Service, port: ServicePort, *,
                 include_not_ready: bool = False) -> builtins.list[Backend]:
        """Endpoints of one service port: ready ones (all with ``include_not_ready``).

        When none is ready, endpoints that are serving while terminating are returned, the
        graceful-termination fallback kube-proxy uses. Duplicates across slices are merged.
        """
        seen: dict[tuple[str, int], Backend] = {}
        for sl in self.slices_for(service):
            slice_number = _port_number(sl.ports, port)
            for ep in sl.endpoints:
                number = slice_number if ep.ports is None else _port_number(ep.ports, port)
                if number is None:
                    continue
                ready = ep.ready or service.publish_not_ready
                for ip in ep.addresses:
                    b = _backend(ep, ip, number, ready)
                    if (ip, number) not in seen or (ready and not seen[(ip, number)].ready):
                        seen[(ip, number)] = b
        found = sorted(seen.values(), key=lambda b: (b.ip, b.port))
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
        best: tuple[int, int, int, Key] | None = None
        chosen = None
        for key, dr in self._objects["DestinationRule"].items():
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
        known: dict[tuple[Key, str], bool] = self._cached("rule_names_service", dict)
        key = (_key(dr), zone)
        if key not in known:  # computed once per rule until Services or rules change
            suffix = f".svc.{zone}"
            known[key] = any(_host_matches(dr, f"{s_name}.{s_ns}{suffix}", zone)
                             for s_ns, s_name in self._objects["Service"])
        return known[key]

    def _cached(self, name: str, build: Callable[[], Any]) -> Any:
        if name not in self._index:
            self._index[name] = build()
        return self._index[name]

    def _slices_by_service(self) -> dict[Key, builtins.list[EndpointSlice]]:
        out: dict[Key, builtins.list[EndpointSlice]] = {}
        for sl in self._objects["EndpointSlice"].values():
            if sl.service_name:
                out.setdefault((sl.meta.namespace, sl.service_name), []).append(sl)
        for slices in out.values():
            slices.sort(key=lambda s: s.meta.name)
        return out


_INDEX_DEPENDS: dict[str, set[str]] = {
    "service_by_ip": {"Service"},
    "namespaces": {"Namespace", "Service"},
    "slices": {"EndpointSlice"},
    "rule_names_service": {"Service", "DestinationRule"},
}


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
