"""Virtual Pod addresses from ``modules.edgeCNI.meshCIDR`` (Edge CNI, issue 17 item 2), sans-IO.

Edge nodes often run plain Docker: every node's Pods are ``172.17.0.x``, so a Pod IP names no
Pod cluster-wide. The agent gives a remote Pod whose real IP is not usable from here a virtual
address (VIP) from the mesh range, answers it in DNS (``dns/zone.py``) and intercepts the whole
range with one rule per protocol (``podip.py``); the connection or datagram is carried through
the tunnel to the Pod's node, whose agent dials the Pod's real IP (its own Pod).

Addresses (``Allocator``): a Pod's VIP is derived from its cluster-wide identity,
``<namespace>/<name>``: ``sha256`` of it picks an offset in the range, and a taken offset
probes on to the next free one. New identities are placed in ``(hash, identity)`` order, so
every node that knows the same Pods gives each the same address, and an agent restarted with
the same Pods gives the same addresses again. A placed identity keeps its address while it
exists (live connections survive other Pods coming and going); it is released when its Pod is
gone. Where it cannot (two Pods whose hashes collide, learnt in a different order by two
nodes, or placed before and after a restart) the two may swap: the address is stable per node,
and equal across nodes whenever no probing was needed (a /16 holds ~65k; with 1,000 Pods about
one in 130 probes). A full range places no more: the Pod keeps its real address, logged and
counted (``edgemesh_cni_virtual_ip_exhausted_total``).

Which Pods are shown by VIP (``AddressPlan``, per ``modules.edgeCNI.mode``):

- ``podIP``: none, every answer is the Pod's real address (a flat, routed Pod network);
- ``virtual``: every Pod on another node;
- ``auto`` (default): a Pod on another node whose real IP is not usable here — the address is
  claimed by Pods on two or more nodes, or is one of this node's own Pods or addresses, or lies
  in a network routed here that holds this node's own Pods (the local Docker bridge
  ``172.17.0.0/16``: a remote ``172.17.0.9`` would land on it), or reaches nowhere (neither a
  route of the kernel nor a range the Edge CNI intercepts: IPv6, a failed steer).

A Pod on this node is always answered by its real address and is never intercepted. Headless
Services that opt in to the legacy behaviour (``edgemesh.kubeedge.io/headless-proxy: "true"``,
or ``modules.edgeCNI.headlessProxy``) get a VIP too (identity ``svc:<namespace>/<name>``), which
the proxy balances like a ClusterIP with the Service's port mapping.

Limits: IPv4 only; a VIP is good on every node that knows the same Pods, but a client should
still take it from its own node's DNS; the default range ``100.127.0.0/16`` is the last /16 of
the RFC 6598 shared address space (carrier-grade NAT, rarely used inside a site): a site whose
WAN or VPN (Tailscale uses all of 100.64.0.0/10) sits in it must choose another range.
"""
from __future__ import annotations

import enum
import hashlib
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from edgemesh.config import DEFAULT_MESH_CIDR
from edgemesh.proxy.podmap import Network, PodMap

HEADLESS_PROXY_ANNOTATION = "edgemesh.kubeedge.io/headless-proxy"


class Mode(enum.Enum):
    AUTO = "auto"
    POD_IP = "podIP"
    VIRTUAL = "virtual"


def _offset(identity: str, size: int) -> int:
    digest = hashlib.sha256(identity.encode()).digest()
    return int.from_bytes(digest[:8], "big") % size


@dataclass
class Allocator:
    """Identities → addresses of one IPv4 range (its network and broadcast addresses unused)."""
    network: ipaddress.IPv4Network
    assigned: dict[str, int] = field(default_factory=dict)  # identity -> offset (1..size)
    owners: dict[int, str] = field(default_factory=dict)  # offset -> identity
    texts: dict[str, str] = field(default_factory=dict)  # identity -> its address, spelled
    exhausted: int = 0  # identities that found no free address, counted over time

    @classmethod
    def of(cls, cidr: str) -> Allocator:
        net = ipaddress.ip_network(cidr, strict=False)
        assert isinstance(net, ipaddress.IPv4Network)
        return cls(net)

    @property
    def size(self) -> int:
        return self.network.num_addresses - 2

    def sync(self, identities: Iterable[str]) -> list[str]:
        """Release identities no longer present, place new ones; returns those that found no
        free address (each counted in ``exhausted``)."""
        want = set(identities)
        for gone in [i for i in self.assigned if i not in want]:
            del self.owners[self.assigned.pop(gone)]
            del self.texts[gone]
        size, unplaced = self.size, []
        for identity in sorted((i for i in want if i not in self.assigned),
                               key=lambda i: (_offset(i, size), i)):
            if len(self.assigned) >= size:
                unplaced.append(identity)
                continue
            offset = _offset(identity, size)
            while offset + 1 in self.owners:
                offset = (offset + 1) % size
            self.assigned[identity] = offset + 1
            self.owners[offset + 1] = identity
            self.texts[identity] = str(self.network.network_address + offset + 1)
        self.exhausted += len(unplaced)
        return unplaced

    def address(self, identity: str) -> str | None:
        return self.texts.get(identity)

    def owner(self, ip: str) -> str | None:
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            return None
        if addr not in self.network:
            return None
        return self.owners.get(int(addr) - int(self.network.network_address))


@dataclass(frozen=True, slots=True)
class PodTarget:
    """Where a Pod VIP leads: the Pod's node and its real address there."""
    node: str
    ip: str
    pod: str  # "<namespace>/<name>"


@dataclass(frozen=True, slots=True)
class ServiceTarget:
    """Where a headless-proxy VIP leads: the Service, balanced like a ClusterIP."""
    namespace: str
    name: str


@dataclass
class AddressPlan:
    """The virtual addresses this node hands out, and what DNS shows for each Pod address."""
    node: str
    cidr: str = DEFAULT_MESH_CIDR
    mode: Mode = Mode.AUTO
    allocator: Allocator = field(init=False)
    shown: dict[tuple[str, str], str] = field(default_factory=dict)  # (node, real IP) -> VIP
    targets: dict[str, PodTarget | ServiceTarget] = field(default_factory=dict)  # VIP -> where
    services: dict[tuple[str, str], str] = field(default_factory=dict)  # (ns, name) -> VIP
    by_namespace_ip: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    version: int = 0  # bumped when what DNS shows changed
    listeners: list[Callable[[], None]] = field(default_factory=list)  # told after a change

    def __post_init__(self) -> None:
        self.allocator = Allocator.of(self.cidr)

    def notify(self) -> None:
        for listener in self.listeners:
            listener()

    def update(self, pods: PodMap, *, headless_proxied: Iterable[tuple[str, str]] = (),
               routed: Iterable[Network] = (), local: Iterable[str] = (),
               steered: Iterable[str] = ()) -> list[str]:
        """Recompute the plan; returns the identities left without a VIP (range full)."""
        svc_ids = {f"svc:{ns}/{name}": (ns, name) for ns, name in headless_proxied}
        pod_ids = list(pods.pods) if self.mode is not Mode.POD_IP else []
        # services first in the order: a Service VIP never loses its address to a Pod
        unplaced = self.allocator.sync([*svc_ids, *pod_ids])
        decide = _Usable(pods, self.node, list(routed), set(local), list(steered))
        shown: dict[tuple[str, str], str] = {}
        targets: dict[str, PodTarget | ServiceTarget] = {}
        by_ns: dict[tuple[str, str], list[str]] = {}
        for pod in pod_ids:
            node, ip = pods.pods[pod]
            vip = self.allocator.address(pod)
            if vip is None or node == self.node:
                continue
            if self.mode is Mode.VIRTUAL or not decide.usable(ip):
                shown[(node, ip)] = vip
                targets[vip] = PodTarget(node, ip, pod)
                by_ns.setdefault((pod.split("/", 1)[0], ip), []).append(vip)
        services = {}
        for identity, key in svc_ids.items():
            vip = self.allocator.address(identity)
            if vip is not None:
                services[key] = vip
                targets[vip] = ServiceTarget(*key)
        if (shown, services) != (self.shown, self.services):
            self.version += 1
        self.shown, self.targets, self.services = shown, targets, services
        own = {(pod.split("/", 1)[0], ip) for pod, (node, ip) in pods.pods.items()
               if node == self.node}  # this node's own Pod at that address keeps it
        self.by_namespace_ip = {k: tuple(sorted(v)) for k, v in by_ns.items() if k not in own}
        return unplaced

    # -- what DNS and the proxy ask --

    def address(self, node: str, ip: str) -> str:
        """What DNS answers for the Pod address ``ip`` on ``node``: its VIP or ``ip``."""
        return self.shown.get((node, ip), ip)

    def pod_name_addresses(self, namespace: str, ip: str) -> tuple[str, ...]:
        """The VIPs a ``a-b-c-d.<namespace>.pod`` name stands for (() when the real one)."""
        return self.by_namespace_ip.get((namespace, ip), ())

    def target(self, vip: str) -> PodTarget | ServiceTarget | None:
        return self.targets.get(vip)

    def service_address(self, namespace: str, name: str) -> str | None:
        return self.services.get((namespace, name))

    def view(self, limit: int = 50) -> dict[str, object]:
        """For ``/debug/proxy``: the range, mode and a bounded list of the VIPs handed out."""
        listed = sorted(self.targets.items(), key=lambda kv: ipaddress.IPv4Address(kv[0]))
        return {"meshCIDR": self.cidr, "mode": self.mode.value,
                "virtualIPs": len(self.targets), "exhausted": self.allocator.exhausted,
                "virtualIPList": [
                    {"vip": vip, **({"pod": t.pod, "node": t.node, "ip": t.ip}
                                    if isinstance(t, PodTarget)
                                    else {"service": f"{t.namespace}/{t.name}"})}
                    for vip, t in listed[:limit]]}


@dataclass
class _Usable:
    """Whether a remote Pod's real IP reaches that Pod from this node (mode ``auto``).
    IPv4 as integers: this runs for every Pod at every plan change (ipaddress objects made
    a 10,000-Pod plan ~4x slower)."""
    pods: PodMap
    node: str
    routed: list[Network]
    local: set[str]
    steered: list[str]

    def __post_init__(self) -> None:
        own = [a for a in (_v4(ip) for ip, owners in self.pods.ips.items()
                           if self.node in owners) if a is not None]
        own_nets = [_pair(net) for net, owner in self.pods.cidrs if owner == self.node]
        routed = [_pair(net) for net in self.routed]
        # routed networks holding this node's own Pods: its Pod network (the Docker bridge)
        self.own_networks = [n for n in own_nets if n is not None] + [
            n for n in routed if n is not None and any(a & n[1] == n[0] for a in own)]
        self.routed_nets = [n for n in routed if n is not None]
        # thousands of steered /32s are one set lookup, the few ranges a scan
        self.steered_ips = {s[:-3] for s in self.steered if s.endswith("/32")}
        self.steered_nets = [n for n in (_pair(ipaddress.ip_network(s, strict=False))
                                         for s in self.steered if not s.endswith("/32"))
                             if n is not None]

    def usable(self, ip: str) -> bool:
        owners = self.pods.ips.get(ip, {})
        if len(owners) > 1 or self.node in owners or ip in self.local:
            return False
        a = _v4(ip)
        if a is None:
            return False  # IPv6 is not carried: not usable from here
        if any(a & mask == net for net, mask in self.own_networks):
            return False
        return ip in self.steered_ips or any(a & mask == net for net, mask in self.steered_nets) \
            or any(a & mask == net for net, mask in self.routed_nets)


def _v4(ip: str) -> int | None:
    """Canonical dotted-quad IPv4 text → its integer (None for IPv6)."""
    if ":" in ip:
        return None
    a, b, c, d = ip.split(".")
    return (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d)


def _pair(net: Network) -> tuple[int, int] | None:
    """An IPv4 network as (network integer, mask integer); None for IPv6."""
    if net.version != 4:
        return None
    return int(net.network_address), int(net.netmask)


def headless_proxied(service: Any, default: bool) -> bool:
    """Whether a headless Service takes the legacy path (a balanced VIP): its
    ``edgemesh.kubeedge.io/headless-proxy`` annotation ("true"/"false"), else ``default``."""
    if not service.headless:
        return False
    value = service.meta.annotations.get(HEADLESS_PROXY_ANNOTATION)
    return default if value is None else value.strip().lower() == "true"
