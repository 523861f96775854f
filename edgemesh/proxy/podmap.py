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

Pod IPs are keyed by (node, IP): plain Docker gives every node's Pods ``172.17.0.x``, so one
address may name a Pod on each of several nodes (``ips[ip]`` maps each node to its Pod). Such
an address is never intercepted by value (which node would it go to?): this node's own Pod at
that address stays local and untouched, and remote ones are reached by their virtual address
(``meshcidr.py``). An address named exactly (slice or Pod) wins over a node's range. Each Pod
identity (``<namespace>/<name>`` of a ``targetRef`` or Pod) is on one node at one address
(``pods``, preferring IPv4; a Pod seen on two nodes: the last seen, until the next sync).
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
    """Pod IP → node(s), Pod identity → (node, IP), and per-node Pod ranges."""
    ips: dict[str, dict[str, str]] = field(default_factory=dict)  # IP -> {node: pod or ""}
    pods: dict[str, tuple[str, str]] = field(default_factory=dict)  # "ns/name" -> (node, IP)
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
                    ident = f"{ref.namespace or sl.meta.namespace}/{ref.name}" \
                        if ref.name else ""
                    for ip in ep.addresses:
                        if ip not in hosts:
                            out._add(ip, ep.node_name, ident)
        for pod in pods:
            if pod.node_name and not pod.host_network:
                for ip in pod.pod_ips:
                    if ip not in hosts:
                        out._add(ip, pod.node_name, f"{pod.meta.namespace}/{pod.meta.name}")
        for node in nodes:
            for cidr in node.pod_cidrs:
                try:
                    out.cidrs.append((ipaddress.ip_network(cidr, strict=False), node.meta.name))
                except ValueError:
                    continue
        return out

    def _add(self, ip: str, node: str, pod: str) -> None:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return
        ip = str(addr)
        owners = self.ips.setdefault(ip, {})
        owners[node] = pod or owners.get(node, "")
        if pod:
            known = self.pods.get(pod)
            if known is None or known[0] != node or (":" in known[1] and addr.version == 4):
                self.pods[pod] = (node, ip)

    def node_of(self, ip: str) -> str | None:
        """The node the Pod at ``ip`` runs on, or None when no source names it or Pods on
        several nodes share the address (``on_node`` asks about one node)."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        owners = self.ips.get(str(addr))
        if owners is not None:
            return next(iter(owners)) if len(owners) == 1 else None
        return self._range_owner(addr)

    def on_node(self, ip: str, node: str) -> bool:
        """Whether ``node`` has a Pod at ``ip`` (an exact claim, else its podCIDR)."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        owners = self.ips.get(str(addr))
        if owners is not None:
            return node in owners
        return self._range_owner(addr) == node

    def _range_owner(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
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
        for ip, owners in self.ips.items():
            if node in owners or len(owners) > 1:
                continue  # own Pod (left alone), or shared by several nodes (by VIP only)
            net = ipaddress.ip_network(ip)
            if any(_within(net, r) for r in [*remote, *routed, *mine]):
                continue
            out.add(str(net))
        return out


def _within(a: Network, b: Network) -> bool:
    return a.version == b.version and a.subnet_of(b)  # type: ignore[arg-type]


def _overlaps(a: Network, b: Network) -> bool:
    return a.version == b.version and a.overlaps(b)


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
