"""The agent's ``modules.edgeProxy``: listeners per service port, interception rules, dialer.

Reconciled from the store (level-triggered): every change to Services, endpoints or
DestinationRules, and every ``iptablesSyncPeriod`` seconds, the module computes the ports it
should serve, opens and closes listeners to match, hands each listener its current endpoints
and balancer, then rewrites the interception rules in one ``iptables-restore``.

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
127.0.0.1 for clients on this node only) on its ``nodePort``. All of them lead to the port's
one listener. Service addresses that are not IP addresses, or that the API server would
refuse as externalIPs (loopback, link-local, multicast, unspecified), are skipped, counted and
logged once; IPv6 ones are skipped (IPv4 rules only).

Listeners bind ``listenAddress`` (default: the agent's ``bridgeDeviceIP``) on ephemeral ports;
with ``iptables: false`` (``--no-iptables``) they bind ``listenAddress`` or 127.0.0.1 and
nothing on the host is changed — ``/debug/proxy`` lists where each port listens.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from edgemesh import netdev
from edgemesh.agent import Context
from edgemesh.meta.models import PROXY_NAME_LABEL, AppProtocol, Service, ServicePort
from edgemesh.proxy import http_listen, iptables
from edgemesh.proxy.dialer import Dialer
from edgemesh.proxy.iptables import NODE, Portal
from edgemesh.proxy.policy import Balancers
from edgemesh.proxy.tcp import TCPListener, TCPProxy
from edgemesh.proxy.udp import UDPListener
from edgemesh.runtime import metrics
from edgemesh.runtime.logs import Once
from edgemesh.runtime.tasks import Reconciler

log = logging.getLogger(__name__)
_once = Once()

BAD_SERVICE_IPS = metrics.counter("edgemesh_proxy_invalid_service_ips_total",
                                  "Distinct service addresses skipped as not IP addresses "
                                  "or as loopback, link-local, multicast or unspecified.")

WATCHED = ("Service", "EndpointSlice", "Endpoints", "DestinationRule")


@dataclass(frozen=True)
class PortKey:
    namespace: str
    name: str
    port: int
    protocol: str  # "tcp" | "udp"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port}/{self.protocol}"


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
        self.dialer: Dialer = ctx.services.get("dialer") or Dialer(ctx.node_name,
                                                                   cfg.connectTimeout)
        ctx.services["dialer"] = self.dialer
        self.balancers = Balancers(ctx.store, cfg, ctx.node_name)
        ctx.services["balancers"] = self.balancers
        self.listen_ip = cfg.listenAddress or (ctx.config.commonConfig.bridgeDeviceIP
                                               if cfg.iptables else "127.0.0.1")
        self.tcp: TCPProxy | None = None
        self.listeners: dict[PortKey, Any] = {}
        self.addresses: dict[PortKey, list[str]] = {}  # where each port is intercepted
        self.rules: iptables.Rules | None = None
        self.synced = False
        self.reconciler = Reconciler("proxy-sync", self.sync, period=cfg.iptablesSyncPeriod,
                                     delay=0.05)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        self.dialer.tunnel = self.ctx.services.get("tunnel")
        if cfg.iptables:
            self._prepare_host()
        self.tcp = TCPProxy(self.dialer, cfg.connectTimeout, cfg.tcpIdleTimeout,
                            cfg.maxConnections)
        self.ctx.admin.add_check("proxy", self._readiness)
        self.ctx.admin.add_view("proxy", self.view)
        self.ctx.store.subscribe(self.reconciler.wake, WATCHED)
        self.ctx.store.subscribe(self._on_sync_state, ())
        self.reconciler.start()

    def stop(self) -> None:
        self.ctx.store.unsubscribe(self.reconciler.wake)
        self.ctx.store.unsubscribe(self._on_sync_state)
        self.reconciler.stop()
        if self.rules is not None:
            self.rules.remove()
            iptables.remove_routes(self.config.serviceCIDR)
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()
        if self.tcp is not None:
            self.tcp.close()

    def _on_sync_state(self, changed: frozenset[str]) -> None:
        if not changed:
            self.reconciler.wake()

    def _prepare_host(self) -> None:
        device = netdev.ensure(self.ctx.config)  # shared with DNS; idempotent
        self.rules = iptables.Rules()
        log.info("iptables backend: %s", self.rules.binary)
        iptables.ensure_routes(self.config.serviceCIDR, device)

    def _readiness(self) -> str:
        if not self.ctx.store.synced:
            return "waiting for metadata"
        return "" if self.synced else (self.reconciler.last_error or "first sync pending")

    # ---- reconciling --------------------------------------------------------------------------

    def desired(self) -> dict[PortKey, tuple[Service, ServicePort]]:
        """Every service port this agent should listen for, from the store's current state."""
        want: dict[PortKey, tuple[Service, ServicePort]] = {}
        for svc in self.ctx.store.services():
            if not proxied(svc, self.config.serviceFilterMode) or not cluster_ips(svc):
                continue
            for port in svc.ports:
                transport = transport_of(port)
                if transport:
                    want[PortKey(svc.meta.namespace, svc.meta.name, port.port, transport)] = \
                        (svc, port)
        return want

    def sync(self) -> None:
        if not self.ctx.store.synced:
            return
        want = self.desired()
        for key in [k for k in self.listeners if k not in want]:
            self.listeners.pop(key).close()
        portals = []
        for key, (svc, port) in want.items():
            listener = self._listener_for(key, svc, port)
            to_ip, to_port = listener.address[:2]
            mine = [Portal(ip, port.port, key.protocol, to_ip, to_port, str(key))
                    for ip in service_ips(svc)]
            node_port = node_port_of(svc, port)
            if node_port:
                mine.append(Portal(NODE, node_port, key.protocol, to_ip, to_port, str(key)))
            self.addresses[key] = [f"{p.ip or 'node'}:{p.port}" for p in mine]
            portals += mine
        self.addresses = {k: v for k, v in self.addresses.items() if k in want}
        self.balancers.retain({(k.namespace, k.name, k.port) for k in want})
        if self.rules is not None:
            self.rules.sync(portals, self.config.nodePortAddresses)
        self.synced = True

    def _listener_for(self, key: PortKey, svc: Service, port: ServicePort) -> Any:
        balancer = self.balancers.get(svc, port)
        backends = self.ctx.store.backends(svc, port)
        listener = self.listeners.get(key)
        kind = http_listen.kind_for(port, balancer.spec, self.config.perRequestHTTP)  # issue 5
        if listener is not None and getattr(listener, "kind", None) != kind:  # mode changed
            self.listeners.pop(key).close()
            listener = None
        if listener is not None:
            listener.update(balancer, backends)
            return listener
        cfg = self.config
        if kind is not None:  # issue 5: http per request, https with SNI (proxy/http_listen.py)
            listener = http_listen.make(kind, self, str(key), svc, port, balancer, backends)
        elif key.protocol == "udp":
            listener = UDPListener(self.dialer, str(key), self.listen_ip, balancer, backends,
                                   idle_timeout=cfg.udpIdleTimeout,
                                   max_sessions=cfg.maxUDPSessions)
        else:
            assert self.tcp is not None
            listener = TCPListener(self.tcp, str(key), self.listen_ip, balancer, backends)
        self.listeners[key] = listener
        log.info("listening for %s on %s:%d", key, *listener.address)
        return listener

    def view(self) -> dict[str, Any]:
        """``/debug/proxy``: listeners, where they are reached (``node:<nodePort>`` for a
        NodePort), their endpoints and policy, and the rule backend."""
        out = []
        for key, listener in sorted(self.listeners.items(), key=lambda kv: str(kv[0])):
            spec = listener.balancer.spec
            out.append({"service": f"{key.namespace}/{key.name}", "port": key.port,
                        "protocol": key.protocol,
                        "listen": f"{listener.address[0]}:{listener.address[1]}",
                        "addresses": self.addresses.get(key, []),
                        "policy": spec.policy.value, "hashKey": spec.hash_key.value,
                        "affinitySeconds": spec.affinity_timeout,
                        "endpoints": [f"{b.ip}:{b.port}" for b in listener.backends]})
        return {"listeners": out, "iptables": self.rules.binary if self.rules else None,
                "activeConnections": len(self.tcp.conns) if self.tcp else 0}


def build(ctx: Context) -> ProxyModule:
    return ProxyModule(ctx)
