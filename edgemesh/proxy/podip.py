"""Edge CNI (issue 17, item 1): remote Pod IPs reached through the tunnel, TCP and UDP.

The path: a client on this node (a process, or a Pod behind the node's bridge) connects or
sends to a Pod IP that lives on another node and that the kernel cannot route (no route other
than the default one: a Pod behind another site's NAT). ``PodNetworks`` steers every such range
— other nodes' ``spec.podCIDRs`` and the Pod IPs of the pod map (``podmap.py``) outside them,
all ports — to the proxy's transparent listeners with ``ProxyModule.steer``: a DNAT rule per
range for TCP, TPROXY (and a MARK for this node's own datagrams) for UDP.

- TCP: ``PodIPPort`` reads the connection's original destination (``SO_ORIGINAL_DST``), asks
  the pod map for the Pod's node and hands the connection to the proxy's TCP path with that
  one endpoint: the dialer opens a tunnel stream to the node's agent, which connects to the Pod
  locally.
- UDP: ``PodUDPPort`` is a ``udp.TransparentUDPPort`` whose session per (client, Pod address)
  goes to that Pod alone, through the tunnel's datagram stream; replies leave from the Pod's
  address (``IP_TRANSPARENT``), datagram boundaries kept. Where TPROXY is missing, UDP Pod IPs
  are not carried (logged once).

The receiving agent dials only its own node's Pods (``tunnel/policy.py``: any port of a Pod
IP it places on itself, never an address of the host) and refuses, counts and logs once
anything else.

Left alone: this node's own Pods, and every address within a route of the main table other
than the default route (``podmap.routed_networks``: on-link LANs, a real CNI's per-node routes),
read again at every sync: where the kernel already routes, nothing is intercepted. An address
in a remote range that belongs to no Pod known by IP is still carried (a range is steered
whole); the remote agent refuses it unless it is in its own podCIDR.

Limits, by design:
- ICMP (ping, path MTU errors) is never carried: the tunnel carries streams and datagrams,
  not packets. IPv4 only for now.
- The Pod sees the remote agent (its node's address) as the source, not the client: the
  connection is re-originated on the Pod's node.
- One rule per remote Pod IP outside a podCIDR (an nft/ipset set would make thousands of Pods
  one rule; not done).
- Pod IPs that collide (plain Docker, every node's Pods ``172.17.0.x``, issue 17 item 2) are not
  handled yet: the pod map keeps one node per address (the last seen), so such an address
  reaches at most one of the Pods, and a remote Pod whose IP equals one of this node's Pods is
  not intercepted at all. Virtual addresses from a ``meshCIDR`` are the planned answer.
"""
from __future__ import annotations

import json
import logging
import subprocess
import time
from typing import Any

from edgemesh.meta.store import Backend, Store
from edgemesh.proxy.dialer import Dialer
from edgemesh.proxy.podmap import PodMap, routed_networks
from edgemesh.proxy.tcp import REJECTED, TCPPort, TCPProxy
from edgemesh.proxy.transparent import original_dst
from edgemesh.proxy.udp import DROPPED, TransparentUDPPort
from edgemesh.runtime import metrics
from edgemesh.runtime.logs import Once

log = logging.getLogger(__name__)
_once = Once()

POD_CONNECTIONS = metrics.counter("edgemesh_cni_pod_connections_total",
                                  "TCP connections to remote Pod IPs, by node.", ["node"])
POD_SESSIONS = metrics.counter("edgemesh_cni_pod_udp_sessions_total",
                               "UDP sessions to remote Pod IPs, by node.", ["node"])
POD_DATAGRAMS = metrics.counter("edgemesh_cni_pod_datagrams_total",
                                "Datagrams from clients to remote Pods, by node.", ["node"])
POD_DATAGRAM_BYTES = metrics.counter("edgemesh_cni_pod_datagram_bytes_total",
                                     "Bytes of the datagrams from clients to remote Pods, by "
                                     "node.", ["node"])
NAME = "pod-ip"
WATCHED = ("EndpointSlice", "Endpoints", "Pod", "Node")


class _One:
    """The balancer of one connection: its Pod, once."""
    wants_client_ip = False

    def pick(self, backends: Any, key: Any = None, exclude: Any = ()) -> Backend | None:
        return backends[0] if backends and backends[0] not in exclude else None

    def release(self, backend: Backend) -> None:
        pass


_ONE = _One()


class PodIPPort(TCPPort):
    """The handler of every steered Pod range: each connection goes to its own Pod."""

    def __init__(self, proxy: TCPProxy, pods: PodNetworks) -> None:
        super().__init__(proxy, NAME, _ONE, [])  # type: ignore[arg-type]
        self.pods = pods

    def accept(self, client: Any, addr: tuple[Any, ...]) -> None:
        try:
            ip, port = original_dst(client, client.family)
        except OSError:
            ip, port = "", 0
        node = self.pods.map.node_of(ip) if port else None
        if node is None or node == self.pods.node:
            REJECTED.labels(NAME, "no pod").inc()
            if _once(("nopod", ip)):
                log.warning("connection from %s to %s:%d: no remote Pod there; closed",
                            addr[0], ip, port)
            client.close()
            return
        POD_CONNECTIONS.labels(node).inc()
        one = TCPPort(self.proxy, NAME, _ONE, [Backend(ip, port, node)])  # type: ignore[arg-type]
        one._counters = self.counters
        one.accept(client, addr)


class PodUDPPort(TransparentUDPPort):
    """The UDP handler of every steered Pod range: a session per (client, Pod address), its
    replies sent from the Pod's address (``IP_TRANSPARENT``), each datagram carried whole."""

    def __init__(self, dialer: Dialer, pods: PodNetworks, *, idle_timeout: float,
                 max_sessions: int) -> None:
        super().__init__(dialer, NAME, _ONE, [],  # type: ignore[arg-type]
                         idle_timeout=idle_timeout, max_sessions=max_sessions)
        self.pods = pods
        self._per_node: dict[str, tuple[Any, Any]] = {}  # node -> (datagrams, bytes) counters

    def forward(self, session: Any, data: bytes) -> None:
        """Count the datagram under its Pod's node (a session goes to one Pod), then send it."""
        node = session.backend.node_name
        counters = self._per_node.get(node)
        if counters is None:
            counters = self._per_node[node] = (POD_DATAGRAMS.labels(node),
                                               POD_DATAGRAM_BYTES.labels(node))
        counters[0].inc()
        counters[1].inc(len(data))
        super().forward(session, data)

    def datagram(self, data: bytes, client: tuple[str, int], local: tuple[str, int]) -> None:
        if (client, local) not in self.sessions and self._remote(local[0]) is None:
            DROPPED.labels(NAME).inc()
            if _once(("nopod-udp", local[0])):
                log.warning("datagram from %s to %s:%d: no remote Pod there; dropped",
                            client[0], *local)
            return
        super().datagram(data, client, local)

    def _remote(self, ip: str) -> str | None:
        node = self.pods.map.node_of(ip)
        return None if node == self.pods.node else node

    def backends_for(self, local: tuple[str, int]) -> list[Backend]:
        node = self._remote(local[0])
        if node is None:
            return []
        POD_SESSIONS.labels(node).inc()
        return [Backend(local[0], local[1], node)]


def route_table(family: int = 4) -> list[dict[str, Any]]:
    """The main routing table as ``ip -j route show`` gives it ([] when ``ip`` fails)."""
    try:
        out = subprocess.run(["ip", "-j", f"-{family}", "route", "show", "table", "main"],
                             capture_output=True, timeout=10, check=True).stdout
        routes = json.loads(out or b"[]")
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        if _once("routes"):
            log.warning("cannot read the routing table (%s); every remote Pod range is "
                        "intercepted", e)
        return []
    return routes if isinstance(routes, list) else []


class PodNetworks:
    """Keeps the pod map and the steered ranges up to date (called from the proxy's sync)."""

    def __init__(self, store: Store, node: str, proxy: TCPProxy, steer: Any, unsteer: Any,
                 *, udp_idle_timeout: float = 60.0, max_udp_sessions: int = 4096) -> None:
        self.store, self.node = store, node
        self.map = PodMap()
        self.ports: dict[str, Any] = {
            "tcp": PodIPPort(proxy, self),
            "udp": PodUDPPort(proxy.dialer, self, idle_timeout=udp_idle_timeout,
                              max_sessions=max_udp_sessions)}
        self._steer, self._unsteer = steer, unsteer
        self.steered: dict[str, set[str]] = {"tcp": set(), "udp": set()}
        self._revision = -1

    def sync(self) -> None:
        """Rebuild the map when the store changed; steer new remote ranges, unsteer gone
        ones (the routing table is read at every call: routes change under us)."""
        started = time.monotonic()
        if self._revision != self.store.revision:
            self._revision = self.store.revision
            self.map = PodMap.build(self.store.list("EndpointSlice"), self.store.pods(),
                                    self.store.list("Node"))
        want = {r for r in self.map.remote_ranges(self.node, routed_networks(route_table()))
                if ":" not in r}  # IPv4 only for now
        for protocol, steered in self.steered.items():
            added = sorted(want - steered)
            gone = steered - want
            for cidr in sorted(gone):
                self._unsteer(protocol, cidr)
            now = want.copy()
            for cidr in added:
                if not self._steer(protocol, cidr, (1, 65535), self.ports[protocol]):
                    now.discard(cidr)
                    if _once(("unsteerable", protocol)):
                        log.warning("edge CNI: remote Pod IPs are not carried over %s here (no "
                                    "transparent %s listener)", protocol.upper(), protocol)
            if added or gone:
                log.info("edge CNI: carrying %d remote Pod ranges over %s, %d added, %d "
                         "removed (%.0f ms)", len(now), protocol.upper(), len(now & set(added)),
                         len(gone), (time.monotonic() - started) * 1e3)
            self.steered[protocol] = now

    def view(self) -> dict[str, Any]:
        return {"pod_ips": len(self.map.ips), "pod_cidrs": [str(n) for n, _ in self.map.cidrs],
                "steered": {p: sorted(s) for p, s in self.steered.items()}}

