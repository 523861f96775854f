"""What a peer may ask this node to dial: only endpoints of services that live on this node.

The Go EdgeMesh dialled any ip:port a peer named (an open proxy). Here a stream's target
``(proto, ip, port)`` must be an endpoint (any service, any port, ready or not) whose
``nodeName`` is this node; everything else is refused and counted by reason.
"""
from __future__ import annotations

from edgemesh.meta.store import Store
from edgemesh.runtime import metrics
from edgemesh.tunnel.frames import Proto, Target

REFUSED = metrics.counter("edgemesh_tunnel_streams_refused_total",
                          "Streams peers opened that this node refused, by reason.", ["reason"])

Key = tuple[Proto, str, int]


class LocalEndpoints:
    """The set of (proto, ip, port) endpoints on ``node``, rebuilt when the store changes."""

    def __init__(self, store: Store, node: str) -> None:
        self.store = store
        self.node = node
        self._revision = -1
        self._allowed: frozenset[Key] = frozenset()

    def allows(self, target: Target) -> bool:
        if self._revision != self.store.revision:
            self._allowed = frozenset(self._build())
            self._revision = self.store.revision
        return (target.proto, target.ip, target.port) in self._allowed

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
