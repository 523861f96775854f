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
read again at every sync (one netlink dump, no helper process): where the kernel already
routes, nothing is intercepted. An address in a remote range that belongs to no Pod known by
IP is still carried (a range is steered whole); the remote agent refuses it unless it is in
its own podCIDR.

Limits, by design:
- ICMP (ping, path MTU errors) is never carried: the tunnel carries streams and datagrams,
  not packets. IPv4 only for now.
- The Pod sees the remote agent (its node's address) as the source, not the client: the
  connection is re-originated on the Pod's node.
- One rule per remote Pod IP outside a podCIDR (an nft/ipset set would make thousands of Pods
  one rule; not done).
- Pod IPs that collide (plain Docker, every node's Pods ``172.17.0.x``) are keyed by (node, IP)
  in the pod map and never intercepted by value: this node's own Pod at that address stays
  local, and remote ones are reached by their virtual address.

Virtual addresses (issue 17 item 2, ``meshcidr.py``): the whole ``modules.edgeCNI.meshCIDR``
is steered with one rule per protocol to the same handlers. A Pod VIP leads to (node, real IP)
— the connection or datagram goes through the tunnel to that node, whose agent dials the real
IP, its own Pod; a headless-proxy Service VIP leads to the Service, balanced like a ClusterIP
over its endpoints with its port mapping (TCP; over UDP its first endpoint). A VIP that leads
nowhere (a Pod deleted or moved here since) is refused like an unknown Pod IP. The plan is
recomputed at every sync whose inputs changed (store revision, routes, host addresses), so a
moved or deleted Pod's VIP goes within one sync; connections and UDP sessions already open
keep their path until they end or idle out. The plan is shared with DNS
(``Context.mesh_addresses``), which drops its cached answers when it changes.
"""
from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
from typing import Any

from edgemesh import netlink
from edgemesh.dialer import Dialer
from edgemesh.meta.store import Backend, Store
from edgemesh.proxy.meshcidr import AddressPlan, PodTarget, headless_proxied
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
EXHAUSTED = metrics.counter("edgemesh_cni_virtual_ip_exhausted_total",
                            "Pods or Services that found no free address in meshCIDR.")
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
        port_handler = self.pods.tcp_port_for(ip, port) if port else None
        if port_handler is None:
            REJECTED.labels(NAME, "no pod").inc()
            if _once(("nopod", ip)):
                log.warning("connection from %s to %s:%d: no remote Pod there; closed",
                            addr[0], ip, port)
            client.close()
            return
        port_handler.accept(client, addr)


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
        if (client, local) not in self.sessions and not self.pods.udp_backends(*local):
            DROPPED.labels(NAME).inc()
            if _once(("nopod-udp", local[0])):
                log.warning("datagram from %s to %s:%d: no remote Pod there; dropped",
                            client[0], *local)
            return
        super().datagram(data, client, local)

    def backends_for(self, local: tuple[str, int]) -> list[Backend]:
        backends = self.pods.udp_backends(*local)
        if backends:
            POD_SESSIONS.labels(backends[0].node_name).inc()
        return backends


def route_table(family: int = 4) -> list[dict[str, Any]]:
    """The main routing table as ``ip -j route show`` gives it, read with one netlink dump
    (``ip`` only where netlink is refused; [] when that fails too)."""
    try:
        return netlink.dump_routes(socket.AF_INET if family == 4 else socket.AF_INET6)
    except OSError as e:
        log.debug("netlink route dump failed (%s); asking ip", e)
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
    """Keeps the pod map, the address plan and the steered ranges up to date (called from the
    proxy's sync)."""

    def __init__(self, store: Store, node: str, proxy: TCPProxy, steer: Any, unsteer: Any,
                 *, udp_idle_timeout: float = 60.0, max_udp_sessions: int = 4096,
                 plan: AddressPlan | None = None, balancers: Any = None,
                 headless_proxy: bool = False,
                 local_addresses: Any = None) -> None:
        self.store, self.node = store, node
        self.map = PodMap()
        self.proxy = proxy
        self.plan = plan or AddressPlan(node)
        self.balancers = balancers
        self.headless_proxy = headless_proxy
        self._local_addresses = local_addresses or _local_addresses
        self.ports: dict[str, Any] = {
            "tcp": PodIPPort(proxy, self),
            "udp": PodUDPPort(proxy.dialer, self, idle_timeout=udp_idle_timeout,
                              max_sessions=max_udp_sessions)}
        self._steer, self._unsteer = steer, unsteer
        self.steered: dict[str, set[str]] = {"tcp": set(), "udp": set()}
        self._revision = -1
        self._proxied: list[tuple[str, str]] = []
        self._planned: tuple[Any, ...] = ()  # what the plan was last computed from

    # -- what the handlers ask --

    def remote_node(self, ip: str) -> str | None:
        """The node of the remote Pod at the real address ``ip`` (None: own, shared, none)."""
        node = self.map.node_of(ip)
        return None if node == self.node else node

    def tcp_port_for(self, ip: str, port: int) -> TCPPort | None:
        """A one-connection ``TCPPort`` for a connection to ``ip:port`` (a remote Pod IP, a
        Pod VIP or a headless-proxy VIP), or None when nothing is there."""
        target = self.plan.target(ip)
        if target is None:
            node = self.remote_node(ip)
            if node is None:
                return None
            backends, balancer, name = [Backend(ip, port, node)], _ONE, NAME
        elif isinstance(target, PodTarget):
            backends, balancer, name = [Backend(target.ip, port, target.node)], _ONE, NAME
        else:
            found = self._service_port(target.namespace, target.name, port, "TCP")
            if found is None:
                return None
            svc, sp = found
            backends = self.store.backends(svc, sp)
            balancer = self.balancers.get(svc, sp) if self.balancers is not None else _ONE
            name = f"{target.namespace}/{target.name}:{port}"
        if name == NAME:
            POD_CONNECTIONS.labels(backends[0].node_name).inc()
        one = TCPPort(self.proxy, name, balancer, backends)  # type: ignore[arg-type]
        if name == NAME:
            one._counters = self.ports["tcp"].counters
        return one

    def udp_backends(self, ip: str, port: int) -> list[Backend]:
        target = self.plan.target(ip)
        if target is None:
            node = self.remote_node(ip)
            return [Backend(ip, port, node)] if node is not None else []
        if isinstance(target, PodTarget):
            return [Backend(target.ip, port, target.node)]
        found = self._service_port(target.namespace, target.name, port, "UDP")
        return self.store.backends(*found)[:1] if found is not None else []

    def _service_port(self, namespace: str, name: str, port: int,
                      protocol: str) -> tuple[Any, Any] | None:
        svc = self.store.service(namespace, name)
        if svc is None:
            return None
        for sp in svc.ports:
            if sp.port == port and sp.protocol == protocol:
                return svc, sp
        return None

    # -- the sync --

    def sync(self) -> None:
        """Rebuild the map when the store changed; recompute the address plan; steer new
        remote ranges (and the mesh range), unsteer gone ones (the routing table and the
        host's addresses are read at every call: they change under us)."""
        started = time.monotonic()
        if self._revision != self.store.revision:
            self._revision = self.store.revision
            self.map = PodMap.build(self.store.list("EndpointSlice"), self.store.pods(),
                                    self.store.list("Node"))
            self._proxied = [svc.key for svc in self.store.services()
                             if headless_proxied(svc, self.headless_proxy)]
        routed = routed_networks(route_table())
        want = {r for r in self.map.remote_ranges(self.node, routed)
                if ":" not in r}  # IPv4 only for now
        version = self.plan.version
        local = self._local_addresses()
        inputs = (self._revision, tuple(routed), frozenset(local), frozenset(want))
        unplaced = []
        if inputs != self._planned:  # a periodic sync with nothing new costs no replanning
            self._planned = inputs
            unplaced = self.plan.update(self.map, headless_proxied=self._proxied,
                                        routed=routed, local=local, steered=want)
        if unplaced:
            EXHAUSTED.inc(len(unplaced))
            if _once(("exhausted", len(self.plan.allocator.assigned))):
                log.warning("edge CNI: meshCIDR %s is full; %d Pods or Services keep their "
                            "real address (first: %s)", self.plan.cidr, len(unplaced),
                            unplaced[0])
        mesh = self.plan.allocator.network
        if any(net.overlaps(mesh) for net in routed if net.version == 4) \
                and _once(("mesh-overlaps", str(mesh))):
            log.warning("edge CNI: meshCIDR %s overlaps a route of this node (%s); traffic "
                        "there is intercepted as virtual Pod addresses: choose another range",
                        mesh, ", ".join(str(n) for n in routed
                                        if n.version == 4 and n.overlaps(mesh)))
        want.add(str(mesh))
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
        if self.plan.version != version:
            self.plan.notify()

    def view(self) -> dict[str, Any]:
        return {"pod_ips": len(self.map.ips), "pod_cidrs": [str(n) for n, _ in self.map.cidrs],
                "steered": {p: sorted(s) for p, s in self.steered.items()},
                "podNetworks": sorted(set().union(*self.steered.values())
                                      - {str(self.plan.allocator.network)}),
                **self.plan.view()}


def _local_addresses() -> set[str]:
    from edgemesh import netdev

    return netdev.local_addresses()
