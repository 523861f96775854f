"""The zone's records, kept equal to the store Service by Service (sans-IO).

``ZoneIndex.refresh(store, serial)`` brings its ``ZoneData`` up to the store's revision: the
first time (or when the store's change journal no longer reaches back) every Service is indexed;
after that only the Services a write touched (``store.changes_since``: the Service itself, or
the one its EndpointSlices/Endpoints belong to) have their records rebuilt, and their PTR
entries replaced. ``rebuilt`` counts the records built, so tests can prove a change to one
Service of thousands rebuilds one.

Memory: records use slots; ports tuples that many Services share (``80/tcp http``) are one
object; an endpoint's IP is the store's own string when already canonical; the reverse index
maps an IP to the records that own it, and PTR targets are spelled when asked.
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

from edgemesh.dns.zone import EndpointRecord, PortRecord, ServiceKind, ServiceRecord, ZoneData

Key = tuple[str, str]
Owners = ServiceRecord | tuple[ServiceRecord, ...]


class ZoneIndex:
    """A ``ZoneData`` and the store revision it reflects."""

    def __init__(self, zone: str, ttl: int, ns_ips: tuple[str, ...] = ()) -> None:
        self.data = ZoneData(zone=zone.lower().rstrip("."), ttl=ttl, ns_ips=ns_ips)
        self.revision = -1
        self.rebuilt = 0  # Service records built so far
        self._ports: dict[tuple[tuple[str, str, int], ...], tuple[PortRecord, ...]] = {}

    def refresh(self, store: Any, serial: int) -> ZoneData:
        """The zone data for the store's current state (updated in place)."""
        data = self.data
        data.serial, data.synced = serial, store.synced
        if store.revision == self.revision:
            return data
        changes = store.changes_since(self.revision) if self.revision >= 0 else None
        if changes is None:
            self._rebuild(store)
        else:
            for key in sorted(changes.services):
                self._update(store, key)
            if "Namespace" in changes.keys or "Service" in changes.keys:
                data.namespaces = _namespaces(store)
        self.revision = store.revision
        return data

    def _rebuild(self, store: Any) -> None:
        data = self.data
        data.services, data.reverse = {}, {}
        for svc in store.services():
            self._add(self._record(store, svc))
        data.namespaces = _namespaces(store)

    def _update(self, store: Any, key: Key) -> None:
        lower = (key[0].lower(), key[1].lower())
        old = self.data.services.pop(lower, None)
        if old is not None:
            for ip in _owned_ips(old):
                _unlink(self.data.reverse, ip, old)
        svc = store.service(*key)
        if svc is not None:
            self._add(self._record(store, svc))

    def _add(self, rec: ServiceRecord) -> None:
        self.data.services[(rec.namespace, rec.name)] = rec
        for ip in _owned_ips(rec):
            _link(self.data.reverse, ip, rec)

    def _record(self, store: Any, svc: Any) -> ServiceRecord:
        """One Service's records, from the Service and its slices."""
        self.rebuilt += 1
        name, namespace = _lower(svc.meta.name), _lower(svc.meta.namespace)
        ports = self._shared(tuple((p.name.lower(), p.protocol.lower(), p.port)
                                   for p in svc.ports))
        if svc.type == "ExternalName":
            return ServiceRecord(name, namespace, ServiceKind.EXTERNAL_NAME, ports=ports,
                                 external_name=svc.external_name.lower().rstrip("."))
        endpoints: dict[tuple[str, str], EndpointRecord] = {}
        for sl in store.slices_for(svc):
            sl_ports = self._shared(tuple((p.name.lower(), (p.protocol or "TCP").lower(), p.port)
                                          for p in sl.ports if p.port))
            for ep in sl.endpoints:
                if not (ep.ready or svc.publish_not_ready):
                    continue  # D2.2: not-ready endpoints produce no records at all
                for ip in ep.addresses:
                    ip = canonical(ip)
                    # per (node, IP): plain Docker's Pods share addresses across nodes
                    if (ep.node_name, ip) not in endpoints:
                        host = _lower(ep.hostname) if ep.hostname else ""
                        endpoints[(ep.node_name, ip)] = EndpointRecord(host, ip, sl_ports,
                                                                       ep.node_name)
        ordered = tuple(sorted(endpoints.values(), key=lambda e: (e.label, e.ip, e.node)))
        if svc.headless:
            return ServiceRecord(name, namespace, ServiceKind.HEADLESS, ports=ports,
                                 endpoints=ordered)
        ips = tuple(canonical(ip) for ip in svc.cluster_ips if ip and ip != "None")
        return ServiceRecord(name, namespace, ServiceKind.CLUSTER_IP, ips=ips, ports=ports,
                             endpoints=ordered)

    def _shared(self, ports: tuple[tuple[str, str, int], ...]) -> tuple[PortRecord, ...]:
        found = self._ports.get(ports)
        if found is None:
            found = self._ports[ports] = tuple(PortRecord(*p) for p in ports)
        return found


def canonical(ip: str) -> str:
    """``ip`` in its canonical text form; the same string object when it already is (IPv4)."""
    if ":" not in ip and _dotted_quad(ip):
        return ip
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


# Canonical IPv4 text: four decimal octets 0-255 without leading zeros. Fixed repetition and
# alternatives of bounded length: matching is linear in the text.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def _dotted_quad(text: str) -> bool:
    """``text`` is canonical IPv4, checked without ipaddress's cost (60,000 at 10k Services)."""
    return _DOTTED_QUAD.fullmatch(text) is not None


def _lower(text: str) -> str:
    return text if text.islower() else text.lower()


def _namespaces(store: Any) -> frozenset[str]:
    return frozenset(ns.lower() for ns in store.namespaces())


def _owned_ips(rec: ServiceRecord) -> set[str]:
    if rec.kind is ServiceKind.EXTERNAL_NAME:
        return set()
    ips = {ep.ip for ep in rec.endpoints}
    if rec.kind is ServiceKind.CLUSTER_IP:
        ips.update(rec.ips)
    return ips


def _link(reverse: dict[str, Owners], ip: str, rec: ServiceRecord) -> None:
    owners = reverse.get(ip)
    if owners is None:
        reverse[ip] = rec
    else:
        reverse[ip] = (*owners, rec) if isinstance(owners, tuple) else (owners, rec)


def _unlink(reverse: dict[str, Owners], ip: str, rec: ServiceRecord) -> None:
    owners = reverse.get(ip)
    if owners is rec:
        del reverse[ip]
    elif isinstance(owners, tuple):
        rest = tuple(o for o in owners if o is not rec)
        reverse[ip] = rest[0] if len(rest) == 1 else rest


def zone_data_from(store: Any, zone: str, ttl: int, serial: int,
                   ns_ips: Iterable[str] = ()) -> ZoneData:
    """Index the store's Services, EndpointSlices/Endpoints and Namespaces for answering (a
    full build; the DNS module keeps a ``ZoneIndex`` up to date)."""
    return ZoneIndex(zone, ttl, tuple(ns_ips)).refresh(store, serial)
