"""The agent's ``modules.edgeProxy``: interception rules, the listeners they lead to, dialer.

Reconciled from the store (level-triggered): every change to Services, endpoints or
DestinationRules, and every ``iptablesSyncPeriod`` seconds, the module computes the ports it
should serve, creates and drops their handlers, hands each its current endpoints and
balancer, then brings the interception rules up to date. After the first sync, a sync looks
only at the Services the store's journal says were written since the last one
(``store.changes_since``: a Service or its endpoints) and hands the rules only their portals
(``iptables.Rules.change``), so one change costs what it changed, whatever the number of
Services; it looks at every port (keeping those unchanged) when a DestinationRule changed, the
journal was outrun, a steered range or IPv6 addresses are involved, or the rules drifted or
failed. A change after a quiet spell is synced at once; syncs are at least 50 ms apart, so a
burst of changes shares a few (``Reconciler(min_interval=)``). Each sync logs one summary line
(``carrying 10000 service ports, 3 added, 1 removed (12 ms)``; per-port lines at ``-v 4``).
The periodic resync compares the kernel's rules with the applied ones and rewrites them whole
only when they drifted. A port's endpoints are read from the store when it first needs them
(``Endpoints``): most of 10,000 ports never see a connection.

Which services are served: those with a ClusterIP (not headless, not ExternalName), minus those
``serviceFilterMode`` leaves to kube-proxy by the ``service.edgemesh.kubeedge.io/
service-proxy-name`` label (``FilterIfLabelExists``: skip labelled services;
``FilterIfLabelDoesNotExists``: serve only labelled ones), as the Go EdgeMesh does. UDP ports
are carried as UDP; every other protocol (HTTP, gRPC, WebSocket, TCP) as TCP bytes; SCTP is
not carried.

Each served port is reached, as kube-proxy reaches it, at every IPv4 ClusterIP, every
``spec.externalIPs`` address and (type LoadBalancer) every ``status.loadBalancer.ingress`` IP
whose ``ipMode`` is not ``Proxy``, on the service port; and (types NodePort and LoadBalancer)
at every local address of this node within ``nodePortAddresses`` (default: all of them;
127.0.0.1 for clients on this node only) on its ``nodePort``. Service addresses that are not
IP addresses, or that the API server would refuse as externalIPs (loopback, link-local,
multicast, unspecified), are skipped, counted and logged once.

One socket per protocol and family, whatever the number of Services (issue 16). Every
intercepted (address, port) of a family leads to one transparent listener of its protocol
(``transparent.py``), which finds the flow's original destination and looks it up in a
``steering.Steering`` table; the handler registered there takes the flow over:

- TCP: ``nat`` DNAT of every service (IP, port) and NodePort to one listening socket, and
  ``getsockopt(SO_ORIGINAL_DST)`` (``IP6T_SO_ORIGINAL_DST`` for IPv6) on each accepted
  connection. Handlers: ``tcp.TCPPort`` (spliced), ``http_listen.TLSPort`` (SNI peeked, then
  spliced), ``http_listen.HTTPListener`` (balanced per request by the HTTP engine).
- UDP: ``mangle`` TPROXY of every service (IP, port) and NodePort to one socket with
  ``IP_RECVORIGDSTADDR``, with ``fwmark → table 237: local default route on lo``; this
  node's own datagrams to service addresses are marked in ``mangle OUTPUT`` so they take the
  same route through lo and meet TPROXY in PREROUTING (TPROXY exists only there). Handler:
  ``udp.TransparentUDPPort``, whose session binds a socket to the service address
  (``IP_TRANSPARENT``) and connects it to the client: replies leave from the address the
  client sent to (ClusterIP, externalIP, node address and nodePort), and TPROXY delivers the
  client's next datagrams to that socket. Why: a socket per session costs one descriptor
  and no extra syscall per datagram; one reply socket with ``IP_PKTINFO`` cannot set the
  source port, and DNAT to one UDP socket cannot tell two services apart for one client
  socket (conntrack has no ``SO_ORIGINAL_DST`` for UDP, and the reply tuples would clash).
  Where TPROXY is missing (no ``xt_TPROXY``/``nft_tproxy``, or no CAP_NET_ADMIN), UDP ports
  fall back to a DNATed listener each, as before, logged once.

Limits: the listeners see the client's real address (no SNAT), but a TCP connection's original
destination exists only while conntrack tracks it (the rules need conntrack anyway); a
connection straight to a listener's own address finds no service and is closed, counted in
``edgemesh_proxy_unknown_destination_total``. A UDP session costs two descriptors (client side
and endpoint side), at most ``maxUDPSessions`` per port. The marks use bit ``0x2000`` and
routing table 237 (unused by kube-proxy, which uses 0x4000/0x8000, and by Cilium's 0x0f00).

Reuse (Edge CNI, issue 17): ``ProxyModule.steer(protocol, cidr, (first, last), handler)``
leads traffic to a range of addresses and ports (remote Pod networks: ``(1, 65535)``) to the
same transparent listener of the range's family: it adds the rules (DNAT, or TPROXY and MARK
for UDP, of the range and ports, at the next sync) and the ``Steering`` entry; ``unsteer``
undoes it. The handler is a ``tcp.TCPPort``-like object with ``accept(client_socket, addr)``
for TCP, a ``udp.UDPPort``-like one with ``datagram(data, client, original_destination)`` for
UDP; ``original_dst`` (TCP) and the datagram's destination say which Pod was asked. Ranges are
looked up after exact service addresses and before NodePorts; a sync touches only the entries
of the ports it changes, so ranges stay until ``unsteer``. Its user is ``podip.PodNetworks``
(``modules.edgeCNI.enable``), brought up to date at every sync; ``/debug/proxy`` shows it under
``edgeCNI``.

IPv6 (dual-stack services), as kube-proxy does it: IPv6 ClusterIPs, externalIPs and
load-balancer IPs of a served port are intercepted by a separate ``ip6tables`` ruleset with the
same chain names (``iptables.Rules(family=6)``) and reach the IPv6 transparent listeners; so
does its ``nodePort`` on every local IPv6 address within the IPv6 ``nodePortAddresses`` ranges
(none when the key lists IPv4 ranges only; ``::1`` for clients on this node only, as
127.0.0.1), for services of type NodePort or LoadBalancer with an IPv6 service address. The
IPv6 listeners bind ``commonConfig.bridgeDeviceIPv6`` (default ``fd00:169:254:96::16``, a ULA
/128 added to the bridge device without DAD), the least exposed address that works from both
hooks: ``::1`` cannot be a DNAT target for packets from other namespaces (IPv6 has no
``route_localnet``; the kernel drops them), a link-local address needs a zone a DNAT cannot
carry, and a node address or ``::`` would expose the listeners on the network. Like
``bridgeDeviceIP`` it is on no link, routed only locally, and the filter chain accepts only
what our rules sent to it. Each family's handler balances over the port's endpoints of that
family (all endpoints when there are none), as kube-proxy keeps each family to its own.
Nothing of this exists until a served service has an IPv6 address, and it is all removed when
none has any more (the address stays on the bridge until ``edgemesh cleanup``). A host
without ``ip6tables`` or with IPv6 disabled logs that once, counts it in
``edgemesh_proxy_ipv6_failures_total`` and keeps serving IPv4; every sync retries. IPv6
ranges in ``serviceCIDR`` get their route (for clients on this node) when IPv6 starts.

The transparent listeners bind ``listenAddress`` (default: the agent's ``bridgeDeviceIP``) on
ephemeral ports. With ``iptables: false`` (``--no-iptables``) nothing intercepts, so nothing
could tell one listener which service a connection was for: each port gets a listener of its
own on ``listenAddress`` or 127.0.0.1 (the only way to reach a service then; descriptors grow
with service ports in that mode), there are no IPv6 listeners and nothing on the host is
changed — ``/debug/proxy`` lists where each port is reachable (``listen``) and, with iptables,
the shared listeners (``transparent``).
"""
from __future__ import annotations

import ipaddress
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from edgemesh import netdev
from edgemesh.context import Context
from edgemesh.dialer import Dialer
from edgemesh.meta.models import PROXY_NAME_LABEL, AppProtocol, Service, ServicePort
from edgemesh.meta.store import Backend
from edgemesh.proxy import http_listen, iptables
from edgemesh.proxy.iptables import NODE, Portal
from edgemesh.proxy.podip import PodNetworks
from edgemesh.proxy.policy import Balancers
from edgemesh.proxy.steering import Steering
from edgemesh.proxy.tcp import TCPListener, TCPPort, TCPProxy
from edgemesh.proxy.transparent import TransparentTCP, TransparentUDP
from edgemesh.proxy.udp import TransparentUDPPort, UDPListener
from edgemesh.runtime import metrics
from edgemesh.runtime.logs import Once
from edgemesh.runtime.tasks import Reconciler

log = logging.getLogger(__name__)
_once = Once()

BAD_SERVICE_IPS = metrics.counter("edgemesh_proxy_invalid_service_ips_total",
                                  "Distinct service addresses skipped as not IP addresses "
                                  "or as loopback, link-local, multicast or unspecified.")

IPV6_FAILURES = metrics.counter("edgemesh_proxy_ipv6_failures_total",
                                "Failures to serve IPv6 service addresses, by stage (address, "
                                "ip6tables, listener, rules); IPv4 is served regardless.",
                                ["stage"])

WATCHED = ("Service", "EndpointSlice", "Endpoints", "DestinationRule")


@dataclass(frozen=True, slots=True)
class PortKey:
    namespace: str
    name: str
    port: int
    protocol: str  # "tcp" | "udp"
    family: int = 4  # 6: the listener of the port's IPv6 service addresses

    def __str__(self) -> str:
        suffix = "/ipv6" if self.family == 6 else ""
        return f"{self.namespace}/{self.name}:{self.port}/{self.protocol}{suffix}"


def transport_of(port: ServicePort) -> str | None:
    """``udp`` for UDP ports, ``tcp`` for everything carried as a stream, None for SCTP."""
    if port.protocol == "SCTP":
        return None
    return "udp" if port.app is AppProtocol.UDP or port.protocol == "UDP" else "tcp"


def proxied(service: Service, filter_mode: str) -> bool:
    """Whether this agent serves ``service`` (see the module docstring)."""
    if service.headless or service.type == "ExternalName":
        return False
    labelled = PROXY_NAME_LABEL in service.meta.labels
    return not labelled if filter_mode == "FilterIfLabelExists" else labelled


def cluster_ips(service: Service) -> list[str]:
    return [ip for ip in service.cluster_ips if ip and ip != "None" and ":" not in ip]


def _ipv4(service: Service, ip: str) -> bool:
    try:  # the common case without ipaddress's parser: a tenth of the first sync at 10k
        packed = socket.inet_pton(socket.AF_INET, ip)
    except (OSError, ValueError, TypeError):
        packed = b""
    if packed and not (packed[0] in (0, 127) or 224 <= packed[0] <= 239
                       or packed[:2] == b"\xa9\xfe"):
        return True
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        addr = None
    if addr is not None and addr.version == 6:
        return False
    if addr is None or addr.is_loopback or addr.is_link_local or addr.is_multicast \
            or addr.is_unspecified:
        if _once((service.key, ip)):
            BAD_SERVICE_IPS.inc()
            log.warning("service %s/%s: %r is not a usable service address; not intercepted",
                        *service.key, ip)
        return False
    return True


def service_ips(service: Service) -> list[str]:
    """IPv4 addresses whose service ports we intercept: ClusterIPs, externalIPs and (type
    LoadBalancer) load-balancer ingress IPs delivered to nodes, in that order, each once."""
    ips = [*cluster_ips(service), *service.external_ips]
    if service.type == "LoadBalancer":
        ips += [i.ip for i in service.load_balancer_ingress if i.ip and i.ip_mode != "Proxy"]
    return [ip for ip in dict.fromkeys(ips) if _ipv4(service, ip)]


def service_ips6(service: Service) -> list[str]:
    """The IPv6 counterpart of ``service_ips`` (canonical form); unusable IPv6 addresses are
    skipped, counted and logged once as there."""
    ips = [*service.cluster_ips, *service.external_ips]
    if service.type == "LoadBalancer":
        ips += [i.ip for i in service.load_balancer_ingress if i.ip and i.ip_mode != "Proxy"]
    out = []
    for ip in ips:
        if ":" not in ip:
            continue  # IPv4, or not an address at all: service_ips counts it
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            continue  # not an address at all: service_ips counts it
        if addr.version != 6:
            continue
        if addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified \
                or addr.ipv4_mapped is not None:
            if _once((service.key, ip)):
                BAD_SERVICE_IPS.inc()
                log.warning("service %s/%s: %r is not a usable service address; not "
                            "intercepted", *service.key, ip)
            continue
        out.append(str(addr))
    return list(dict.fromkeys(out))


def node_port_of(service: Service, port: ServicePort) -> int | None:
    """The port's nodePort where the service type has one (the API clears it elsewhere; a
    manifest may not)."""
    if service.type not in ("NodePort", "LoadBalancer") or not port.node_port:
        return None
    return port.node_port if 1 <= port.node_port <= 65535 else None


class ProxyModule:
    name = "edgeProxy"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.config = ctx.config.modules.edgeProxy
        cfg = self.config
        self.dialer: Dialer = ctx.dialer
        self.balancers = Balancers(ctx.store, cfg, ctx.node_name)
        self.listen_ip = cfg.listenAddress or (ctx.config.commonConfig.bridgeDeviceIP
                                               if cfg.iptables else "127.0.0.1")
        self.tcp: TCPProxy | None = None
        self.listeners: dict[PortKey, Any] = {}  # the handler of each port (see the docstring)
        self.transparent: dict[int, TransparentTCP] = {}  # by family, with iptables only
        self.transparent_udp: dict[int, TransparentUDP] = {}  # where TPROXY works
        self.rules: iptables.Rules | None = None
        ipv6 = ctx.config.commonConfig.bridgeDeviceIPv6
        self.listen_ip6 = str(ipaddress.IPv6Address(ipv6)) if ipv6 and cfg.iptables else ""
        self.rules6: iptables.Rules | None = None  # exists while IPv6 addresses are served
        self.ipv6_error = ""
        self.synced = False
        self._next_check = 0.0  # when the rules are next compared with the kernel's
        # store changes seen, and up to which one the last good sync went: a periodic wake
        # with nothing new only compares the rules with the kernel's
        self._changes, self._synced_changes = 1, 0
        self._revision = -1  # the store revision the last good sync saw
        self._steered_dirty = False  # a steer()/unsteer() since: the next sync looks at all
        # what each port was built from, and its rules: a sync redoes only ports whose
        # service or endpoints changed (all of them when a DestinationRule did)
        self._seen: dict[PortKey, tuple[Any, list[Portal]]] = {}
        self._steered: dict[tuple[str, str], tuple[tuple[int, int], Any]] = {}  # steer()
        self.pods: PodNetworks | None = None  # the Edge CNI (podip.py), when enabled
        self._rules_seen: tuple[Any, ...] = ()
        self._desired_memo: dict[tuple[str, str], tuple[Service, bool,
                                                        list[tuple[PortKey, ServicePort]]]] = {}
        # a change after a quiet spell is synced at once; a burst shares syncs 50 ms apart
        self.reconciler = Reconciler("proxy-sync", self.sync, period=cfg.iptablesSyncPeriod,
                                     min_interval=0.05)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        if cfg.iptables:
            self._prepare_host()
        self.tcp = TCPProxy(self.dialer, cfg.connectTimeout, cfg.tcpIdleTimeout,
                            cfg.maxConnections)
        if cfg.iptables:
            self._open_transparent(4, self.listen_ip)
            if self.ctx.config.modules.edgeCNI.enable:
                self.pods = PodNetworks(self.ctx.store, self.ctx.node_name, self.tcp,
                                        self.steer, self.unsteer,
                                        udp_idle_timeout=cfg.udpIdleTimeout,
                                        max_udp_sessions=cfg.maxUDPSessions,
                                        plan=self.ctx.mesh_addresses, balancers=self.balancers,
                                        headless_proxy=self.ctx.config.modules.edgeCNI
                                        .headlessProxy)
        elif self.ctx.config.modules.edgeCNI.enable:
            log.warning("edgeCNI needs edgeProxy.iptables; remote Pod IPs are not carried")
        self.ctx.admin.add_check("proxy", self._readiness)
        self.ctx.admin.add_view("proxy", self.view)
        self.ctx.store.subscribe(self._wake, WATCHED + (("Pod", "Node") if self.pods else ()))
        self.ctx.store.subscribe(self._on_sync_state, ())
        self.reconciler.start()

    def stop(self) -> None:
        self.ctx.store.unsubscribe(self._wake)
        self.ctx.store.unsubscribe(self._on_sync_state)
        self.reconciler.stop()
        if self.rules is not None:
            self.rules.remove()
            iptables.remove_routes(self.config.serviceCIDR)
            iptables.remove_tproxy_routing(4)
        self._stop_ipv6()
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()
        for family in (4, 6):
            self._close_transparent(family)
        if self.tcp is not None:
            self.tcp.close()

    def _wake(self, *_: Any) -> None:
        self._changes += 1
        self.reconciler.wake()

    def _on_sync_state(self, changed: frozenset[str]) -> None:
        if not changed:
            self._wake()

    def _prepare_host(self) -> None:
        device = netdev.ensure(self.ctx.config)  # shared with DNS; idempotent
        self.rules = iptables.Rules()
        log.info("iptables backend: %s", self.rules.binary)
        iptables.ensure_routes(iptables.of_family(self.config.serviceCIDR, 4), device)
        if self.listen_ip6 and shutil.which("ip6tables-save"):
            # an agent killed with -9 left its IPv6 ruleset: it is ours to remove, as IPv4's
            # chains are rewritten by the first sync (created again when IPv6 is served)
            iptables.remove_from(iptables.detect_backend(6))

    def _start_ipv6(self) -> bool:
        """The IPv6 address, ruleset and routes, once; False (logged once, counted) where the
        host cannot have them."""
        if self.rules6 is not None:
            return True
        try:
            device = netdev.ensure_ipv6(self.ctx.config)
        except (subprocess.CalledProcessError, OSError) as e:
            detail = getattr(e, "stderr", b"") or b""
            return self._ipv6_failed("address", f"cannot add {self.listen_ip6}: "
                                     f"{detail.decode(errors='replace').strip() or e}")
        binary = iptables.detect_backend(6)
        if shutil.which(f"{binary}-restore") is None or shutil.which(f"{binary}-save") is None:
            return self._ipv6_failed("ip6tables", f"{binary}-restore/-save not found")
        try:
            iptables.ensure_routes(iptables.of_family(self.config.serviceCIDR, 6), device)
        except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as e:
            return self._ipv6_failed("address", f"cannot route the IPv6 service ranges: {e}")
        if self.tcp is not None and 6 not in self.transparent:
            try:
                self._open_transparent(6, self.listen_ip6)
            except OSError as e:
                return self._ipv6_failed("listener", f"cannot listen on {self.listen_ip6}: {e}")
        self.rules6 = iptables.Rules(binary, family=6)
        log.info("IPv6 service addresses: listeners on %s, backend %s", self.listen_ip6, binary)
        return True

    def _ipv6_failed(self, stage: str, message: str) -> bool:
        IPV6_FAILURES.labels(stage).inc()
        if _once(("ipv6", stage, message)):
            log.warning("IPv6 service addresses not intercepted (%s); IPv4 unaffected",
                        message)
        self.ipv6_error = message
        return False

    def _sync_ipv6(self, portals: list[Portal]) -> None:
        assert self.rules6 is not None
        try:
            self.rules6.sync(portals, self.config.nodePortAddresses)
        except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as e:
            detail = getattr(e, "stderr", b"") or b""
            self._ipv6_failed("rules", detail.decode(errors="replace").strip() or str(e))

    def _stop_ipv6(self) -> None:
        """Remove the IPv6 ruleset and routes (the listeners close with their keys)."""
        if self.rules6 is not None:
            self.rules6.remove()
            iptables.remove_routes(iptables.of_family(self.config.serviceCIDR, 6))
            iptables.remove_tproxy_routing(6)
            self.rules6 = None
        self._close_transparent(6)

    def _open_transparent(self, family: int, ip: str) -> None:
        """The family's transparent TCP listener and, where TPROXY works, its UDP one (else
        its UDP ports keep a DNATed listener each, as with ``--no-iptables``)."""
        assert self.tcp is not None
        self.transparent[family] = TransparentTCP(self.tcp, ip)
        try:
            iptables.ensure_tproxy_routing(family)
            self.transparent_udp[family] = TransparentUDP(ip)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = getattr(e, "stderr", b"") or b""
            log.warning("IPv%d UDP service ports get a listener each: no TPROXY (%s)", family,
                        detail.decode(errors="replace").strip() or e)
        udp = self.transparent_udp.get(family)
        log.info("transparent listeners: TCP %s, UDP %s", _where(self.transparent[family]),
                 _where(udp) if udp is not None else "one per port")

    def _close_transparent(self, family: int) -> None:
        for table in (self.transparent, self.transparent_udp):
            listener = table.pop(family, None)
            if listener is not None:
                listener.close()

    def _readiness(self) -> str:
        if not self.ctx.store.synced:
            return "waiting for metadata"
        return "" if self.synced else (self.reconciler.last_error or "first sync pending")

    # ---- reconciling --------------------------------------------------------------------------

    def desired(self) -> dict[PortKey, tuple[Service, ServicePort]]:
        """Every service port this agent should listen for, from the store's current state."""
        ipv6 = bool(self.listen_ip6) and self.rules is not None
        memo = self._desired_memo
        fresh: dict[tuple[str, str], tuple[Service, bool, list[tuple[PortKey, ServicePort]]]] = {}
        want: dict[PortKey, tuple[Service, ServicePort]] = {}
        for svc in self.ctx.store.services():
            last = memo.get(svc.key)
            if last is None or last[0] is not svc or last[1] != ipv6:
                last = (svc, ipv6, self._ports_of(svc, ipv6))  # the service is new or changed
            fresh[svc.key] = last
            for key, port in last[2]:
                want[key] = (svc, port)
        self._desired_memo = fresh
        return want

    def _ports_of(self, svc: Service, ipv6: bool) -> list[tuple[PortKey, ServicePort]]:
        if not proxied(svc, self.config.serviceFilterMode):
            return []
        v4, v6 = bool(cluster_ips(svc)), ipv6 and bool(service_ips6(svc))
        out = []
        for port in svc.ports:
            transport = transport_of(port)
            if transport and v4:
                out.append((PortKey(svc.meta.namespace, svc.meta.name, port.port, transport),
                            port))
            if transport and v6:
                out.append((PortKey(svc.meta.namespace, svc.meta.name, port.port, transport,
                                    6), port))
        return out

    def sync(self) -> None:
        if not self.ctx.store.synced:
            return
        changes = self._changes
        if changes == self._synced_changes and not self.ipv6_error and self._rules_intact():
            return  # a periodic wake, nothing new, no drift, no retry due: nothing to do
        started = time.monotonic()
        revision = self.ctx.store.revision
        touched = self._touched_services()
        if touched is not None and self._sync_services(touched, started):
            self._revision, self._synced_changes = revision, changes
            return
        self._sync_all(started)
        self._revision, self._synced_changes = revision, changes

    def _touched_services(self) -> set[tuple[str, str]] | None:
        """The Services written since the last good sync, when a sync of only their ports is
        enough; None when everything must be looked at (the first sync, a DestinationRule
        changed, the store's journal outrun, a steered range, IPv6 to retry, rules that
        drifted or failed to apply)."""
        if not self.synced or self._revision < 0 or self._steered_dirty or self.ipv6_error:
            return None
        if any(r is not None and r.applied is None for r in (self.rules, self.rules6)):
            return None
        changes = self.ctx.store.changes_since(self._revision)
        if changes is None or "DestinationRule" in changes.keys:
            return None
        return changes.services

    def _sync_services(self, touched: set[tuple[str, str]], started: float) -> bool:
        """Redo the ports of the ``touched`` Services only, and their rules; False (nothing
        done) when the change needs a whole sync (IPv6 service addresses involved)."""
        ipv6 = bool(self.listen_ip6) and self.rules is not None
        memo, store = self._desired_memo, self.ctx.store
        fresh: dict[tuple[str, str], Any] = {}
        for skey in touched:
            svc = store.service(*skey)
            fresh[skey] = (svc, ipv6, self._ports_of(svc, ipv6)) if svc is not None else None
            last = memo.get(skey)
            if any(k.family == 6 for entry in (last, fresh[skey]) if entry is not None
                   for k, _ in entry[2]):
                return False
        gone: list[Portal] = []
        new: list[Portal] = []
        removed = added = 0
        for skey, entry in fresh.items():
            last = memo.pop(skey, None)
            ports = dict(entry[2]) if entry is not None else {}
            if entry is not None:
                memo[skey] = entry
            for key, _ in last[2] if last is not None else ():
                if key not in ports and key in self.listeners:
                    gone += self._drop_port(key)
                    removed += 1
            for key, port in ports.items():
                had = key in self.listeners
                last_portals = self._seen[key][1] if key in self._seen else []
                mine = self._redo_port(key, entry[0], port) or []
                self._seen[key] = ((entry[0], tuple(store.slices_for(entry[0]))), mine)
                gone += last_portals
                new += mine
                added += not had
        if self.pods is not None:
            self.pods.sync()
        if self.rules is not None and not self.rules.change(gone, new,
                                                            self.config.nodePortAddresses):
            self.rules.sync([p for key, (_, mine) in self._seen.items() if key.family == 4
                             for p in mine] + self._steered_portals(4),
                            self.config.nodePortAddresses)
        log.log(logging.INFO if added or removed else logging.DEBUG,
                "carrying %d service ports, %d added, %d removed (%.0f ms)",
                len(self.listeners), added, removed, (time.monotonic() - started) * 1e3)
        return True

    def _drop_port(self, key: PortKey) -> list[Portal]:
        """Stop carrying one port; its portals (whose rules must go)."""
        self._unsteer(key, self.listeners[key])
        self.listeners.pop(key).close()
        self.balancers.discard((key.namespace, key.name, key.port))
        log.debug("no longer carrying %s", key)
        last = self._seen.pop(key, None)
        return last[1] if last is not None else []

    def _redo_port(self, key: PortKey, svc: Service, port: ServicePort) -> list[Portal] | None:
        """(Re)build one port's handler and steering entries from the store; its portals (None
        when its IPv6 listener failed)."""
        old = self.listeners.get(key)
        try:
            handler = self._listener_for(key, svc, port)
        except OSError as e:  # the IPv6 address vanished under us, say
            if key.family == 4:
                raise
            self._ipv6_failed("listener", f"cannot listen on {self.listen_ip6}: {e}")
            self._seen.pop(key, None)
            return None
        if old is not None:
            self._unsteer(key, old)
        mine = self._portals(key, svc, port, handler)
        _register(self._steering(key), mine, handler)
        return mine

    def _sync_all(self, started: float) -> None:
        """Every port looked at (those unchanged are kept), the rules from the whole state."""
        self._steered_dirty = False
        want = self.desired()
        self.ipv6_error = ""  # set again below by whatever fails in this sync
        if not any(k.family == 6 for k in want):
            self._stop_ipv6()
        elif not self._start_ipv6():
            want = {k: v for k, v in want.items() if k.family == 4}
        removed = [k for k in self.listeners if k not in want]
        for key in removed:
            self._unsteer(key, self.listeners[key])
            self.listeners.pop(key).close()
            log.debug("no longer carrying %s", key)
        before = len(self.listeners)
        portals: dict[int, list[Portal]] = {4: [], 6: []}
        rules_now = tuple(self.ctx.store.list("DestinationRule"))
        redo = rules_now != self._rules_seen  # a rule may change any port's balancer
        self._rules_seen = rules_now
        seen: dict[PortKey, tuple[Any, list[Portal]]] = {}
        for key, (svc, port) in want.items():
            state = (svc, tuple(self.ctx.store.slices_for(svc)))
            last = self._seen.get(key)
            if not redo and last is not None and last[0] == state and key in self.listeners:
                seen[key] = last  # nothing of this port changed: its handler and rules stand
                portals[key.family] += last[1]
                continue
            mine = self._redo_port(key, svc, port)
            if mine is None:
                continue
            seen[key] = (state, mine)
            portals[key.family] += mine
        self._seen = seen
        if removed:
            self.balancers.retain({(k.namespace, k.name, k.port) for k in want})
        self._rules_intact()
        if self.pods is not None:
            self.pods.sync()
        if self.rules is not None:
            self.rules.sync(portals[4] + self._steered_portals(4), self.config.nodePortAddresses)
        if self.rules6 is not None:
            self._sync_ipv6(portals[6] + self._steered_portals(6))
        added = len(self.listeners) - before
        log.log(logging.INFO if added or removed or not self.synced else logging.DEBUG,
                "carrying %d service ports, %d added, %d removed (%.0f ms)",
                len(self.listeners), added, len(removed), (time.monotonic() - started) * 1e3)
        self.synced = True

    def _rules_intact(self) -> bool:
        """Every ``iptablesSyncPeriod``: whether the kernel still holds the rules last applied
        (False also makes the next rules sync rewrite them whole); True between checks."""
        if time.monotonic() < self._next_check:
            return True
        self._next_check = time.monotonic() + self.config.iptablesSyncPeriod
        intact = True
        for rules in (self.rules, self.rules6):
            if rules is not None and not rules.check():
                intact = False
        return intact

    def steer(self, protocol: str, cidr: str, ports: tuple[int, int], handler: Any) -> bool:
        """Lead ``protocol`` traffic to ``cidr`` on ``ports`` (inclusive) to ``handler``
        through the transparent listener of the range's family (for the Edge CNI: remote Pod
        networks); False where there is none (no iptables, no TPROXY for UDP, no IPv6 yet).
        The rules follow at the next sync."""
        network = ipaddress.ip_network(cidr, strict=False)
        shared = self.transparent if protocol == "tcp" else self.transparent_udp
        listener = shared.get(network.version)
        if listener is None:
            return False
        self.unsteer(protocol, cidr)
        listener.steering.register_range(str(network), ports, handler)
        self._steered[(protocol, str(network))] = (ports, handler)
        self._steered_dirty = True
        self._wake()
        return True

    def unsteer(self, protocol: str, cidr: str) -> None:
        """Undo ``steer`` for that range."""
        network = ipaddress.ip_network(cidr, strict=False)
        entry = self._steered.pop((protocol, str(network)), None)
        shared = self.transparent if protocol == "tcp" else self.transparent_udp
        listener = shared.get(network.version)
        if entry is not None and listener is not None:
            listener.steering.unregister_range(str(network), entry[1])
            self._steered_dirty = True
            self._wake()

    def _steered_portals(self, family: int) -> list[Portal]:
        out = []
        for (protocol, cidr), ((first, last), _) in self._steered.items():
            shared = self.transparent if protocol == "tcp" else self.transparent_udp
            listener = shared.get(family)
            if listener is not None and (":" in cidr) == (family == 6):
                to_ip, to_port = listener.address[:2]
                out.append(Portal(cidr, first, protocol, to_ip, to_port, f"steered {cidr}",
                                  protocol == "udp", last))
        return out

    def _steering(self, key: PortKey) -> Steering[Any] | None:
        """The table of the transparent listener the port's traffic goes to, if any."""
        shared = self.transparent if key.protocol == "tcp" else self.transparent_udp
        listener = shared.get(key.family)
        return listener.steering if listener is not None else None

    def _unsteer(self, key: PortKey, handler: Any) -> None:
        last = self._seen.get(key)
        table = self._steering(key)
        if last is None or table is None:
            return
        for p in last[1]:
            if p.ip == NODE:
                table.unregister_node_port(p.port, handler)
            else:
                table.unregister((p.ip,), p.port, handler)

    def _portals(self, key: PortKey, svc: Service, port: ServicePort,
                 handler: Any) -> list[Portal]:
        """The rules leading to the port: its service addresses of the key's family and, where
        enabled, its nodePort, to the transparent listener of its protocol or the port's own
        listener; ``/debug/proxy`` lists them as ``addresses``."""
        tproxy = key.protocol == "udp" and getattr(handler, "address", None) is None
        to_ip, to_port = self._listen_address(key, handler)
        ips = service_ips6(svc) if key.family == 6 else service_ips(svc)
        name = getattr(handler, "name", None) or str(key)  # one string for both
        mine = [Portal(ip, port.port, key.protocol, to_ip, to_port, name, tproxy)
                for ip in ips]
        node_port = node_port_of(svc, port)
        if node_port and iptables.node_ports_enabled(self.config.nodePortAddresses, key.family):
            mine.append(Portal(NODE, node_port, key.protocol, to_ip, to_port, name, tproxy))
        return mine

    def _listen_address(self, key: PortKey, handler: Any) -> tuple[str, int]:
        """Where the port's connections or datagrams are accepted."""
        own = getattr(handler, "address", None)
        if own is None:
            shared = self.transparent if key.protocol == "tcp" else self.transparent_udp
            own = shared[key.family].address
        return own[0], own[1]

    def _listener_for(self, key: PortKey, svc: Service, port: ServicePort) -> Any:
        balancer = self.balancers.get(svc, port)
        backends = Endpoints(self.ctx.store, svc, port, key.family)
        listen_ip = self.listen_ip6 if key.family == 6 else self.listen_ip
        listener = self.listeners.get(key)
        kind = http_listen.kind_for(port, balancer.spec, self.config.perRequestHTTP)  # HTTP mode
        if listener is not None and getattr(listener, "kind", None) != kind:  # mode changed
            self.listeners.pop(key).close()
            listener = None
        if listener is not None:
            listener.update(balancer, backends)
            return listener
        cfg = self.config
        # TCP ports share the transparent listener where there is one: no socket of their own
        own_ip = None if key.protocol == "tcp" and self.transparent else listen_ip
        if kind is not None:  # http per request, https with its SNI read (proxy/http_listen.py)
            listener = http_listen.make(kind, self, str(key), svc, port, balancer, backends,
                                        own_ip)
        elif key.protocol == "udp" and key.family in self.transparent_udp:
            listener = TransparentUDPPort(self.dialer, str(key), balancer, backends,
                                          idle_timeout=cfg.udpIdleTimeout,
                                          max_sessions=cfg.maxUDPSessions)
        elif key.protocol == "udp":
            listener = UDPListener(self.dialer, str(key), listen_ip, balancer, backends,
                                   idle_timeout=cfg.udpIdleTimeout,
                                   max_sessions=cfg.maxUDPSessions)
        else:
            assert self.tcp is not None
            listener = (TCPPort(self.tcp, str(key), balancer, backends) if own_ip is None
                        else TCPListener(self.tcp, str(key), own_ip, balancer, backends))
        self.listeners[key] = listener
        log.debug("carrying %s at %s:%d", key, *self._listen_address(key, listener))
        return listener

    def view(self) -> dict[str, Any]:
        """``/debug/proxy``: listeners, where they are reached (``node:<nodePort>`` for a
        NodePort), their endpoints and policy, and the rule backend."""
        out = []
        for key, listener in sorted(self.listeners.items(), key=lambda kv: str(kv[0])):
            spec = listener.balancer.spec
            host, port = self._listen_address(key, listener)
            out.append({"service": f"{key.namespace}/{key.name}", "port": key.port,
                        "protocol": key.protocol, "family": f"IPv{key.family}",
                        "listen": f"[{host}]:{port}" if key.family == 6 else f"{host}:{port}",
                        "addresses": self._addresses(key),
                        "policy": spec.policy.value, "hashKey": spec.hash_key.value,
                        "affinitySeconds": spec.affinity_timeout,
                        **self._rule_view(key.namespace, key.name),
                        "endpoints": [f"{b.ip}:{b.port}" for b in listener.backends]})
        return {"listeners": out, "iptables": self.rules.binary if self.rules else None,
                "transparent": {f"{protocol}/IPv{family}": _where(listener)
                                for protocol, table in (("tcp", self.transparent),
                                                        ("udp", self.transparent_udp))
                                for family, listener in table.items()},
                "ip6tables": self.rules6.binary if self.rules6 else None,
                "ipv6Error": self.ipv6_error,
                "edgeCNI": self.pods.view() if self.pods is not None else None,
                "activeConnections": len(self.tcp.conns) if self.tcp else 0}

    def _addresses(self, key: PortKey) -> list[str]:
        """Where a port is intercepted, as ``/debug/proxy`` lists it."""
        portals = self._seen[key][1] if key in self._seen else []
        return [f"node:{p.port}" if p.ip == NODE else
                f"[{p.ip}]:{p.port}" if key.family == 6 else f"{p.ip}:{p.port}" for p in portals]

    def _rule_view(self, namespace: str, name: str) -> dict[str, str | None]:
        """The DestinationRule a service follows and how it matched: ``host`` (Istio) or
        ``name`` (the Go EdgeMesh's way, see ``Store.destination_rule_match``)."""
        service = self.ctx.store.service(namespace, name)
        match = self.ctx.store.destination_rule_match(service) if service else None
        if match is None:
            return {"destinationRule": None, "destinationRuleMatchedBy": None}
        meta = match.rule.meta
        return {"destinationRule": f"{meta.namespace}/{meta.name}",
                "destinationRuleMatchedBy": match.by}


class Endpoints(Sequence[Backend]):
    """A port's endpoints, read from the store at their first use: most of 10,000 ports never
    see a connection, so their first sync builds no endpoint objects for them (a tenth of
    its time and of the proxy's memory). Each family gets its own endpoints (as kube-proxy
    does), all of them when it has none. A port is handed a new one whenever its Service
    or endpoints change."""
    __slots__ = ("_args", "_list")

    def __init__(self, store: Any, svc: Service, port: ServicePort, family: int) -> None:
        self._args: tuple[Any, Service, ServicePort, int] | None = (store, svc, port, family)
        self._list: list[Backend] = []

    def _read(self) -> list[Backend]:
        if self._args is not None:
            store, svc, port, family = self._args
            found = store.backends(svc, port)
            self._list = [b for b in found if (":" in b.ip) == (family == 6)] or found
            self._args = None
        return self._list

    def __getitem__(self, index: Any) -> Any:
        return self._read()[index]

    def __len__(self) -> int:
        return len(self._read())

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._read())

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._read())


def _register(table: Steering[Any] | None, portals: list[Portal], handler: Any) -> None:
    """Enter the port's addresses in its transparent listener's table, if it uses one."""
    if table is None:
        return
    for p in portals:
        if p.ip == NODE:
            table.register_node_port(p.port, handler)
        else:
            table.register((p.ip,), p.port, handler)


def _where(listener: Any) -> str:
    host, port = listener.address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def build(ctx: Context) -> ProxyModule:
    return ProxyModule(ctx)
