"""The cluster zone, sans-IO: (question, zone data) → answer records and rcode.

Implements the Kubernetes DNS spec (schema 1.1.0) the way CoreDNS's ``kubernetes`` plugin
does (see docs/specs/dns.md; rule numbers ``Dx.y`` below refer to it):

- ``<svc>.<ns>.svc.<zone>``: A/AAAA of the cluster IPs (D3.1), headless: of the ready endpoints
  (D4.1, NXDOMAIN without any), ExternalName: CNAME (D5); SRV at the bare name for every port
  (D9.2).
- ``<host>.<svc>.<ns>.svc.<zone>``: the ready endpoints with that hostname (D4.2, D9.3).
- ``_<port>._<proto>.<svc>.<ns>.svc.<zone>``: SRV for named ports (D3.2, D4.3).
- ``<a-b-c-d>.<ns>.pod.<zone>``: pod records in ``insecure`` mode, as EdgeMesh runs (D7.1).
- Edge CNI (``ZoneData.addresses``, the agent's ``proxy.meshcidr.AddressPlan`` when
  ``modules.edgeCNI`` is on): an endpoint of a Pod on another node whose real IP is not usable
  here (mode ``auto``: shared with another node's Pod or this node's, or in this node's Pod
  network; ``virtual``: always) is answered by the Pod's virtual address, in headless answers,
  ``<host>.<svc>`` names, SRV additionals and ``a-b-c-d.<ns>.pod`` names (the Pod of that
  namespace with that IP; this node's own Pod at that IP wins and keeps its real address); PTR
  of a virtual address names that Pod's records, PTR of a real address only the records that
  answer it. A headless Service with a headless-proxy VIP is answered like a ClusterIP of that
  address (the legacy EdgeMesh behaviour; its endpoints' own names stay as they were). The
  substitution happens at answer time: the records stay per Service and incremental, and a
  plan change only drops the cached answers.
- PTR for cluster IPs and ready endpoint IPs (D3.3, D4.4); reverse names we do not know are
  not ours (``None``): EdgeMesh's Corefile lets them fall through to the upstream (D11.1).
- ``dns-version.<zone>`` TXT "1.1.0" (D1.2), the apex SOA/NS (D8.6), NXDOMAIN versus NODATA
  with namespaces counted (D8.1-D8.3), the SOA in every negative answer (D6.3), SERVFAIL for
  every cluster-zone name until the store's first sync (D8.5).

Choices where CoreDNS's quirks and RFC semantics differ (the spec page says either is fine):
``dns-version.<zone>`` with a type other than TXT is NODATA (D8.4); an ExternalName whose
in-zone target lacks the asked type answers the CNAME with the target's rcode (D5.2); a
non-SRV question at a ``_port._proto`` name is NODATA. Wildcards are literal labels (D9.1).

Owner names are the question's spelling; generated targets keep the question's spelling of
the service and zone labels (D2.3), so the 0x20 case randomisation of resolvers survives.
"""
from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dnslib import RR, DNSLabel

SCHEMA_VERSION = "1.1.0"
VERSION_TTL = 28800
MAX_CHASE = 8
# dnslib's QTYPE/RCODE values, written out: dnslib (0.9 MB) is imported where the first answer
# is built, never by an idle agent (tests/unit/test_dns_lazy_dnslib.py checks both)
T_A, T_AAAA, T_SRV, T_PTR, T_CNAME = 1, 28, 33, 12, 5
T_TXT, T_SOA, T_NS, T_ANY = 16, 6, 2, 255
NOERROR, NXDOMAIN, SERVFAIL = 0, 3, 2


class ServiceKind(enum.Enum):
    CLUSTER_IP = "ClusterIP"
    HEADLESS = "Headless"
    EXTERNAL_NAME = "ExternalName"


@dataclass(frozen=True, slots=True)
class PortRecord:
    name: str  # lower case; "" for an unnamed port
    protocol: str  # "tcp", "udp", "sctp"
    port: int


@dataclass(frozen=True, slots=True)
class EndpointRecord:
    hostname: str  # the endpoint's own hostname, lower case; "" for none
    ip: str
    ports: tuple[PortRecord, ...]
    node: str = ""  # the endpoint's nodeName (Edge CNI: Pod IPs are per node)

    @property
    def label(self) -> str:
        """Its name's first label: the hostname, else the dashed IP (D2.1), spelled on use
        (tens of thousands of endpoints need not each hold the string)."""
        return self.hostname or dashed_ip(self.ip)


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    name: str
    namespace: str
    kind: ServiceKind
    ips: tuple[str, ...] = ()  # cluster IPs (ClusterIP services)
    ports: tuple[PortRecord, ...] = ()  # service ports
    endpoints: tuple[EndpointRecord, ...] = ()  # ready endpoints, one per IP
    external_name: str = ""


@dataclass
class ZoneData:
    """Everything a cluster-zone answer depends on: one immutable view per store revision."""
    zone: str  # lower case, no trailing dot
    ttl: int = 30
    serial: int = 1
    synced: bool = True
    namespaces: frozenset[str] = frozenset()
    services: dict[tuple[str, str], ServiceRecord] = field(default_factory=dict)
    # ip → the ServiceRecord(s) owning it (edgemesh.dns.records spells the PTR targets)
    reverse: dict[str, Any] = field(default_factory=dict)
    ns_ips: tuple[str, ...] = ()  # glue for the apex NS (our own address)
    # the Edge CNI's address plan (proxy.meshcidr.AddressPlan), None without it: what an
    # endpoint is answered by, and where a virtual address leads
    addresses: Any = None

    def shown(self, ep: EndpointRecord) -> str:
        """The address an endpoint is answered by: its VIP or its real IP."""
        plan = self.addresses
        return ep.ip if plan is None else plan.address(ep.node, ep.ip)

    @property
    def zone_labels(self) -> tuple[str, ...]:
        return tuple(self.zone.split("."))


@dataclass
class Reply:
    """What the zone answers: rcode and the three record sections (dnslib RRs)."""
    rcode: int = NOERROR
    answer: list[RR] = field(default_factory=list)
    authority: list[RR] = field(default_factory=list)
    additional: list[RR] = field(default_factory=list)
    authoritative: bool = True
    chase: str = ""  # an ExternalName target outside the zone, to resolve upstream


# ---- building the data from the store --------------------------------------------------------

def dashed_ip(ip: str) -> str:
    """An endpoint's system-assigned hostname (D2.1): ``172-17-1-2``, ``fd00--1-2``."""
    text = ip.replace(".", "-") if ":" not in ip else ip.replace(":", "-")
    return text + "0" if text.endswith("-") else text


# ---- answering -------------------------------------------------------------------------------

def resolve(data: ZoneData, labels: Sequence[str], qtype: int, depth: int = 0) -> Reply | None:
    """The answer for the name ``labels`` (as asked, latin-1 text), or None if not ours."""
    labels = list(labels)
    lower = [label.lower() for label in labels]
    zl = data.zone_labels
    if len(lower) >= len(zl) and tuple(lower[len(lower) - len(zl):]) == zl:
        zone_as_asked = ".".join(labels[len(labels) - len(zl):])
        if not data.synced:
            return Reply(rcode=SERVFAIL, authoritative=False)
        z = _Asked(data, qtype, zone_as_asked, labels, depth)
        return z.answer(lower[:len(lower) - len(zl)])
    if lower[-2:] in (["in-addr", "arpa"], ["ip6", "arpa"]):
        return _reverse(data, owner_of(labels), qtype, lower)
    return None


class _Asked:
    """One question inside the zone; methods return the Reply for one name shape."""

    def __init__(self, data: ZoneData, qtype: int, zone_as_asked: str,
                 labels: list[str], depth: int) -> None:
        self.data, self.qtype = data, qtype
        self.qname = ".".join(labels)  # for targets: only built once the labels matched
        self.owner = owner_of(labels)
        self.zone_as_asked, self.labels, self.depth = zone_as_asked, labels, depth

    def answer(self, rel: list[str]) -> Reply:
        d = self.data
        if not rel:
            return self._apex()
        if rel == ["dns-version"]:
            if self.qtype in (T_TXT, T_ANY):
                from dnslib import RR, TXT

                return Reply(answer=[RR(self.owner, T_TXT, ttl=VERSION_TTL,
                                        rdata=TXT(SCHEMA_VERSION))])
            return self._negative(NOERROR)
        kind = rel[-1]
        if kind not in ("svc", "pod"):
            return self._negative(NXDOMAIN)
        if len(rel) == 1:
            return self._negative(NOERROR)  # svc.<zone>, pod.<zone> exist (D8.3)
        if rel[-2] not in d.namespaces:
            return self._negative(NXDOMAIN)
        if len(rel) == 2:
            return self._negative(NOERROR)  # an existing namespace (D8.3)
        if kind == "pod":
            return self._pod(rel) if len(rel) == 3 else self._negative(NXDOMAIN)
        svc = d.services.get((rel[-2], rel[-3]))
        if svc is None or len(rel) > 5:
            return self._negative(NXDOMAIN)
        if svc.kind is ServiceKind.HEADLESS and d.addresses is not None:
            vip = d.addresses.service_address(svc.namespace, svc.name)
            if vip is not None:  # headless-proxy: balanced like a ClusterIP of the VIP
                svc = dataclasses.replace(svc, kind=ServiceKind.CLUSTER_IP, ips=(vip,))
        if len(rel) == 3:
            return self._service(svc)
        if len(rel) == 4:
            return self._endpoint(svc, rel[0])
        return self._port(svc, rel[0], rel[1])

    # -- shapes --

    def _apex(self) -> Reply:
        if self.qtype == T_SOA:
            return Reply(answer=[self._soa()])
        if self.qtype == T_NS:
            from dnslib import NS, RR

            target = f"ns.dns.{self.zone_as_asked}"
            return Reply(answer=[RR(self.owner, T_NS, ttl=self.data.ttl, rdata=NS(target))],
                         additional=self._addresses(target, self.data.ns_ips))
        return self._negative(NOERROR)

    def _service(self, svc: ServiceRecord) -> Reply:
        if svc.kind is ServiceKind.EXTERNAL_NAME:
            return self._external(svc)
        if svc.kind is ServiceKind.HEADLESS:
            if not svc.endpoints:
                return self._negative(NXDOMAIN)  # D4.1
            ips = [self.data.shown(ep) for ep in svc.endpoints]
            if self.qtype == T_SRV:  # D9.2: per endpoint and port, named or not
                pairs = [(ep, p) for ep in svc.endpoints for p in ep.ports]
                return self._srv([(f"{ep.label}.{self.qname}", p.port) for ep, p in pairs],
                                 svc)
            return self._address_answer(ips)
        if self.qtype == T_SRV:
            return self._srv([(self.qname, p.port) for p in svc.ports], svc)
        return self._address_answer(list(svc.ips))

    def _endpoint(self, svc: ServiceRecord, label: str) -> Reply:
        matches = [ep for ep in svc.endpoints if ep.label == label]
        if svc.kind is ServiceKind.EXTERNAL_NAME or not matches:
            return self._negative(NXDOMAIN)  # D4.2, D5.3
        return self._address_answer([self.data.shown(ep) for ep in matches])

    def _port(self, svc: ServiceRecord, port_label: str, proto_label: str) -> Reply:
        if svc.kind is ServiceKind.EXTERNAL_NAME:
            return self._negative(NXDOMAIN)  # D5.3
        name, proto = port_label.removeprefix("_"), proto_label.removeprefix("_")
        target_svc = ".".join(self.labels[2:])  # <svc>.<ns>.svc.<zone> as asked
        if svc.kind is ServiceKind.HEADLESS:
            pairs = [(f"{ep.label}.{target_svc}", p.port) for ep in svc.endpoints
                     for p in ep.ports if p.name and p.name == name and p.protocol == proto]
        else:
            pairs = [(target_svc, p.port) for p in svc.ports
                     if p.name and p.name == name and p.protocol == proto]
        if not pairs:
            return self._negative(NXDOMAIN)  # D3.2: name and protocol must both match
        if self.qtype != T_SRV:
            return self._negative(NOERROR)
        return self._srv(pairs, svc)

    def _pod(self, rel: list[str]) -> Reply:
        ip = pod_ip(rel[0])
        if ip is None:
            return self._negative(NXDOMAIN)
        plan = self.data.addresses
        vips = plan.pod_name_addresses(rel[1], ip) if plan is not None else ()
        return self._address_answer(list(vips) or [ip])

    def _external(self, svc: ServiceRecord) -> Reply:
        target = svc.external_name
        if not target or _is_ip(target):
            return self._negative(NXDOMAIN)  # D5.4
        from dnslib import CNAME, RR

        cname = RR(self.owner, T_CNAME, ttl=self.data.ttl, rdata=CNAME(target))
        if self.qtype in (T_CNAME, T_SRV):
            return Reply(answer=[cname]) if self.qtype == T_CNAME else self._negative(NOERROR)
        zone = self.data.zone
        if target == zone or target.endswith("." + zone):
            if self.depth >= MAX_CHASE:
                return Reply(rcode=SERVFAIL)
            inner = resolve(self.data, target.split("."), self.qtype, self.depth + 1)
            assert inner is not None
            inner.answer.insert(0, cname)
            return inner
        return Reply(answer=[cname], chase=target)

    # -- records --

    def _address_answer(self, ips: list[str]) -> Reply:
        """A/AAAA of ``ips`` for the asked family; NODATA when the name has only the other."""
        records = self._addresses(self.owner, ips)
        if self.qtype == T_ANY and records:
            return Reply(answer=records)
        wanted = [r for r in records if r.rtype == self.qtype]
        return Reply(answer=wanted) if wanted else self._negative(NOERROR)

    def _addresses(self, owner: str | DNSLabel, ips: Iterable[str]) -> list[RR]:
        from dnslib import AAAA, RR, A

        out, seen = [], set()
        for ip in ips:
            if ip in seen:
                continue
            seen.add(ip)
            rtype, rdata = (T_AAAA, AAAA(ip)) if ":" in ip else (T_A, A(ip))
            out.append(RR(owner, rtype, ttl=self.data.ttl, rdata=rdata))
        return out

    def _srv(self, pairs: list[tuple[str, int]], svc: ServiceRecord) -> Reply:
        if not pairs:
            return self._negative(NOERROR)
        from dnslib import RR, SRV

        weight = max(1, 100 // len(pairs))
        seen: dict[tuple[str, int], None] = dict.fromkeys((t.lower(), p) for t, p in pairs)
        answer, additional = [], []
        targets: dict[str, str] = {t.lower(): t for t, _ in pairs}
        for target, port in seen:
            answer.append(RR(self.owner, T_SRV, ttl=self.data.ttl,
                             rdata=SRV(0, weight, port, targets[target])))
        for low, target in targets.items():
            host = low.split(".", 1)[0] if svc.kind is ServiceKind.HEADLESS else ""
            ips = [self.data.shown(ep) for ep in svc.endpoints if ep.label == host] \
                if host else svc.ips
            additional.extend(self._addresses(target, ips))
        return Reply(answer=answer, additional=additional)

    def _soa(self) -> RR:
        from dnslib import RR, SOA

        z, ttl = self.zone_as_asked, self.data.ttl
        return RR(z, T_SOA, ttl=min(ttl, 300),
                  rdata=SOA(f"ns.dns.{z}", f"hostmaster.{z}",
                            (self.data.serial, 7200, 1800, 86400, ttl)))

    def _negative(self, rcode: int) -> Reply:
        return Reply(rcode=rcode, authority=[self._soa()])


def owner_of(labels: Sequence[str]) -> DNSLabel:
    """The owner name exactly as asked (labels may hold any byte)."""
    from dnslib import DNSLabel

    return DNSLabel(tuple(label.encode("latin-1") for label in labels))


def pod_ip(label: str) -> str | None:
    """Decode a pod label (D7.1): ``1-2-3-4`` → IPv4, otherwise ``-`` → ``:`` (IPv6)."""
    if label.count("-") == 3 and "--" not in label:
        text = label.replace("-", ".")
    else:
        text = label.replace("-", ":")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def ptr_targets(data: ZoneData, ip: str) -> tuple[str, ...]:
    """The names an IP has in the zone (D3.3, D4.4), sorted; () if none. With the Edge CNI's
    plan: a Pod VIP names the endpoints answered by it, a headless-proxy VIP its Service, and
    a real IP only the endpoints still answered by it."""
    real, plan = ip, data.addresses
    target = plan.target(ip) if plan is not None else None
    if target is not None:
        if not hasattr(target, "node"):  # a headless-proxy Service's VIP
            return (f"{target.name}.{target.namespace}.svc.{data.zone}",)
        real = target.ip
    owners = data.reverse.get(real)
    if owners is None:
        return ()
    out = set()
    for rec in owners if isinstance(owners, tuple) else (owners,):
        fqdn = f"{rec.name}.{rec.namespace}.svc.{data.zone}"
        if rec.kind is ServiceKind.CLUSTER_IP and ip in rec.ips:
            out.add(fqdn)
        if rec.kind is not ServiceKind.EXTERNAL_NAME:
            out.update(f"{ep.label}.{fqdn}" for ep in rec.endpoints
                       if ep.ip == real and data.shown(ep) == ip)
    return tuple(sorted(out))


def _reverse(data: ZoneData, owner: DNSLabel, qtype: int, lower: list[str]) -> Reply | None:
    if not data.synced:
        return None
    ip = ip_from_reverse(lower)
    targets = ptr_targets(data, ip) if ip else ()
    if not targets:
        return None  # falls through to the upstream, as EdgeMesh's Corefile says (D11.1)
    from dnslib import PTR, RR, SOA, DNSLabel

    if qtype not in (T_PTR, T_ANY):
        apex = DNSLabel(owner.label[-2:])
        soa = RR(apex, T_SOA, ttl=min(data.ttl, 300),
                 rdata=SOA(f"ns.dns.{data.zone}", f"hostmaster.{data.zone}",
                           (data.serial, 7200, 1800, 86400, data.ttl)))
        return Reply(authority=[soa])
    return Reply(answer=[RR(owner, T_PTR, ttl=data.ttl, rdata=PTR(t)) for t in targets])


def ip_from_reverse(lower: list[str]) -> str | None:
    """``4.3.2.1.in-addr.arpa`` → ``1.2.3.4``; a full ip6.arpa nibble name → canonical IPv6."""
    body = lower[:-2]
    try:
        if lower[-2] == "in-addr" and len(body) == 4:
            return str(ipaddress.IPv4Address(".".join(reversed(body))))
        if lower[-2] == "ip6" and len(body) == 32 and all(len(n) == 1 for n in body):
            hexits = "".join(reversed(body))
            return str(ipaddress.IPv6Address(int(hexits, 16)))
    except ValueError:
        return None
    return None
