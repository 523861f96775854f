"""The pod map (Edge CNI, issue 17): which node each Pod IP lives on, sans-IO.

Built from what the store already holds, without a Pod watch (the kube source stopped
listing Pods for scale, issue 16):

- EndpointSlices and Endpoints: every endpoint address with a ``nodeName`` and a ``targetRef``
  of kind Pod (ready or not). Every Pod behind a Service is known this way, headless Services
  included — the Pods that DNS hands out by IP; the files source derives such slices from the
  Pods in its manifests. Endpoints without a Pod reference (hand-written slices pointing at
  external addresses) are no Pods: never steered, never dialled by Pod IP.
- Pods the store holds (none from the kube source today; a source may add them): each
  ``status.podIPs`` of a Pod with a ``spec.nodeName`` that is not ``hostNetwork``.
- Nodes' ``spec.podCIDRs`` where the cluster allocates them: a whole range per node, so Pods
  behind no Service are reached too.

Pods outside every Service on a cluster without podCIDRs are unknown here. Bringing them in
without a cluster-wide Pod watch is left for later: a kube watch of Pods with a
``fieldSelector=spec.nodeName=<this node>`` (this node's own Pods, for the receiving side)
costs what this node runs, not what the cluster runs.

An address named by two sources on different nodes goes to the exact one (slice or Pod) over a
range; between two exact ones, the last seen wins (a Pod that moved; the next sync settles).
Addresses that are not IP addresses are skipped, and so are Nodes' own addresses
(``status.addresses``: what a hostNetwork Pod's endpoint shows), which are nodes, not Pods.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from edgemesh.meta.models import EndpointSlice, Node, Pod

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class PodMap:
    """Pod IP → node, and per-node Pod ranges."""
    ips: dict[str, str] = field(default_factory=dict)  # canonical IP -> node name
    cidrs: list[tuple[Network, str]] = field(default_factory=list)  # (podCIDR, node name)

    @classmethod
    def build(cls, slices: Iterable[EndpointSlice], pods: Iterable[Pod] = (),
              nodes: Iterable[Node] = ()) -> PodMap:
        out = cls()
        nodes = list(nodes)
        # a hostNetwork Pod's endpoint is its node's address: never a Pod IP (steering it
        # would capture the tunnel's own connections to that node)
        hosts = {a for node in nodes for _, a in node.addresses}
        for sl in slices:
            for ep in sl.endpoints:
                ref = ep.target_ref
                if ep.node_name and ref is not None and ref.kind == "Pod":
                    for ip in ep.addresses:
                        if ip not in hosts:
                            out._add(ip, ep.node_name)
        for pod in pods:
            if pod.node_name and not pod.host_network:
                for ip in pod.pod_ips:
                    if ip not in hosts:
                        out._add(ip, pod.node_name)
        for node in nodes:
            for cidr in node.pod_cidrs:
                try:
                    out.cidrs.append((ipaddress.ip_network(cidr, strict=False), node.meta.name))
                except ValueError:
                    continue
        return out

    def _add(self, ip: str, node: str) -> None:
        try:
            self.ips[str(ipaddress.ip_address(ip))] = node
        except ValueError:
            pass

    def node_of(self, ip: str) -> str | None:
        """The node the Pod at ``ip`` runs on, or None when no source names it."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        node = self.ips.get(str(addr))
        if node is not None:
            return node
        for net, owner in self.cidrs:
            if addr in net and addr != net.network_address and (
                    net.version == 6 or addr != net.broadcast_address):
                return owner
        return None

    def remote_ranges(self, node: str, routed: Iterable[Network] = ()) -> set[str]:
        """The ranges to intercept on ``node``: other nodes' podCIDRs and their Pod IPs (one
        /32 or /128 each) outside those ranges, minus everything within ``routed`` (networks the
        kernel already routes somewhere other than the default route, ``routed_networks``)."""
        routed = list(routed)
        mine = [net for net, owner in self.cidrs if owner == node]
        out: set[str] = set()
        remote = [net for net, owner in self.cidrs if owner != node]
        for net in remote:
            if not any(_within(net, r) for r in routed) \
                    and not any(_overlaps(net, m) for m in mine):
                out.add(str(net))
        for ip, owner in self.ips.items():
            if owner == node:
                continue
            net = ipaddress.ip_network(ip)
            if any(_within(net, r) for r in [*remote, *routed, *mine]):
                continue
            out.add(str(net))
        return out


def _within(a: Network, b: Network) -> bool:
    return a.version == b.version and a.subnet_of(b)  # type: ignore[arg-type]


def _overlaps(a: Network, b: Network) -> bool:
    return a.version == b.version and a.overlaps(b)  # type: ignore[arg-type]


def routed_networks(routes: Iterable[dict[str, object]]) -> list[Network]:
    """The destinations of ``ip -j route show`` entries other than the default route: where the
    kernel already reaches (on-link LANs, a CNI's per-node routes), which the Edge CNI leaves
    alone. ``unreachable``/``blackhole``/``prohibit`` routes do not count."""
    out: list[Network] = []
    for r in routes:
        dst = r.get("dst")
        if not isinstance(dst, str) or dst == "default" or r.get("type") in (
                "unreachable", "blackhole", "prohibit", "throw"):
            continue
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if net.prefixlen:
            out.append(net)
    return out
