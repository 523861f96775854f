"""What a peer may ask this node to dial: only endpoints of services that live on this node,
and (Edge CNI, with ``pods=True``) this node's own Pods.

The Go EdgeMesh dialled any ip:port a peer named (an open proxy). Here a stream's target
``(proto, ip, port)`` must be an endpoint (any service, any port, ready or not) whose
``nodeName`` is this node, or, with the Edge CNI on, any port of an address the pod map
(``proxy/podmap.py``) places on this node: an endpoint address or Pod IP whose node is this
one, or an address within this node's ``spec.podCIDRs``. An address that Pods on several nodes
share (plain Docker's ``172.17.0.x``, reached by virtual address, ``proxy/meshcidr.py``) is
dialled when one of them is this node's: the peer's agent resolved the virtual address to
(this node, real IP), and the real IP here is this node's own Pod. Never, whatever the map says, an
address of this host itself (a bridge gateway such as ``cni0``'s, the node IP a hostNetwork
Pod reports: those would open every port of the host) nor a loopback, link-local, multicast or
unspecified address; a hostNetwork Pod stays reachable at its Service endpoints' ports.
Everything else is refused and counted by reason.
"""
from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

from edgemesh.meta.store import Store
from edgemesh.proxy.podmap import PodMap
from edgemesh.runtime import metrics
from edgemesh.tunnel.frames import Proto, Target

REFUSED = metrics.counter("edgemesh_tunnel_streams_refused_total",
                          "Streams peers opened that this node refused, by reason.", ["reason"])

Key = tuple[Proto, str, int]


class LocalEndpoints:
    """The set of (proto, ip, port) endpoints on ``node``, rebuilt when the store changes."""

    def __init__(self, store: Store, node: str, *, pods: bool = False,
                 host_addresses: Callable[[], set[str]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.node = node
        self.pods = pods
        self._revision = -1
        self._allowed: frozenset[Key] = frozenset()
        self._map = PodMap()
        self._host_addresses = host_addresses or _host_addresses
        self._clock = clock
        self._host: tuple[float, set[str]] = (-1e9, set())

    def allows(self, target: Target) -> bool:
        if self._revision != self.store.revision:
            self._allowed = frozenset(self._build())
            if self.pods:
                self._map = PodMap.build(self.store.list("EndpointSlice"), self.store.pods(),
                                         self.store.list("Node"))
            self._revision = self.store.revision
        if (target.proto, target.ip, target.port) in self._allowed:
            return True
        return self.pods and self.local_pod(target.ip)

    def local_pod(self, ip: str) -> bool:
        """Whether ``ip`` is a Pod of this node (see the module docstring)."""
        if not self._map.on_node(ip, self.node):
            return False
        addr = ipaddress.ip_address(ip)
        if addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified:
            return False
        now = self._clock()
        if now - self._host[0] > 10.0:  # addresses of this host, read at most every 10 s
            self._host = (now, self._host_addresses())
        return ip not in self._host[1]

    def _build(self) -> set[Key]:
        allowed: set[Key] = set()
        for svc in self.store.services():
            for port in svc.ports:
                proto = {"TCP": Proto.TCP, "UDP": Proto.UDP}.get(port.protocol)
                if proto is None:
                    continue
                for b in self.store.backends(svc, port, include_not_ready=True):
                    if b.node_name == self.node:
                        allowed.add((proto, b.ip, b.port))
        return allowed


def _host_addresses() -> set[str]:
    from edgemesh import netdev
    return netdev.local_addresses()
