"""The edgeGateway module: route table and listeners kept in step with the store.

One reconciler rebuilds the table from the store's Gateways and VirtualServices (and re-reads
the interfaces' addresses every ``interfaceResync`` seconds), then opens and closes listeners.
Every connection looks up its port's *current* spec, so a route change applies to the next
request even on a kept-alive connection, and nothing established is dropped.

Per connection, by port kind:
- HTTP: ``http.serve`` (the proxy's HTTP engine with the gateway's router);
- TLS (HTTPS/TLS servers): peek at the ClientHello's SNI, pick the server; PASSTHROUGH
  splices to the ``tls`` route for that SNI; otherwise terminate with the server's Secret and
  serve HTTP (HTTPS servers) or splice to the ``tcp`` route (TLS servers);
- TCP: splice to the ``tcp`` route of the port.

A terminating server's context is built at every reconcile too: a port whose TLS cannot be set
up (Secret missing, no key, bad certificate) is ``[-] gateway-tls`` in ``/readyz`` and
``tlsErrors`` in ``/debug/gateway``, and its connections are closed after the ClientHello —
never served in plaintext.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import socket
import ssl
from typing import TYPE_CHECKING, Any

import gevent

from edgemesh import netdev
from edgemesh.config import Config, EdgeProxy, LoadBalancer
from edgemesh.errors import UnavailableError
from edgemesh.gateway import http, tcp
from edgemesh.gateway.compile import build_table
from edgemesh.gateway.listeners import (
    ListenerSet,
    check_ip_lists,
    interface_addresses,
    select_addresses,
)
from edgemesh.gateway.routes import PortKind, PortSpec, ServerRef, Table, Target, TLSMode
from edgemesh.gateway.tls import CredentialError, Credentials
from edgemesh.proxy.http_head import HeadLimits
from edgemesh.proxy.http_router import HttpLimits
from edgemesh.proxy.policy import Balancers
from edgemesh.proxy.tls_sni import MAX_HELLO, SniStatus, client_hello_sni
from edgemesh.runtime import metrics, tasks
from edgemesh.runtime.logs import Once

if TYPE_CHECKING:
    from edgemesh.context import Context

log = logging.getLogger(__name__)
_once = Once()

CONNECTIONS = metrics.counter("edgemesh_gateway_connections_total",
                              "Client connections accepted, by port and outcome.",
                              ["port", "outcome"])
ACTIVE = metrics.gauge("edgemesh_gateway_active_connections", "Client connections open now.")


class GatewayModule:
    name = "edgeGateway"

    def __init__(self, ctx: "Context") -> None:
        self.ctx = ctx
        self.cfg = ctx.config.modules.edgeGateway
        cfg = self.cfg
        self.table = Table()
        self.addresses: list[str] = []
        self.settings = HttpLimits(
            head=HeadLimits(cfg.maxHeaderBytes, cfg.maxHeaderFields),
            head_timeout=cfg.requestHeaderTimeout, idle_timeout=cfg.idleTimeout,
            body_timeout=cfg.clientTimeout, response_timeout=cfg.upstreamTimeout,
            connect_timeout=cfg.connectTimeout, max_body=cfg.maxRequestBodyBytes,
            tunnel_idle_timeout=cfg.tcpIdleTimeout)
        self.dialer = dialer = ctx.dialer
        self.balancers = Balancers(ctx.store, _balancing(ctx.config), ctx.node_name)
        self.upstreams = http.Upstreams(ctx.store, self.balancers, dialer)
        self.credentials = Credentials(lambda ns, name: ctx.store.get("Secret", ns, name))
        self.listeners = ListenerSet(self._handle, cfg.maxConnections)
        self.reconciler = tasks.Reconciler("gateway", self.reconcile,
                                           period=cfg.interfaceResync, delay=0.05)
        self.reconciled = False
        self.tls_errors: dict[str, str] = {}  # "port N (gateway servers[i])" → why not

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        problem = check_ip_lists(self.cfg.includeIP, self.cfg.excludeIP)
        if problem:
            from edgemesh.errors import ConfigError
            raise ConfigError([problem])
        self.ctx.store.subscribe(self.reconciler.wake, ["Gateway", "VirtualService", "Secret"])
        self.ctx.admin.add_check("gateway", lambda: "" if self.reconciled else
                                 "route table not built yet")
        self.ctx.admin.add_check("gateway-tls", lambda: "; ".join(
            f"{where}: {why}" for where, why in sorted(self.tls_errors.items())))
        self.ctx.admin.add_view("gateway", self.view)
        self.reconciler.start()

    def stop(self) -> None:
        self.ctx.store.unsubscribe(self.reconciler.wake)
        self.reconciler.stop()
        self.listeners.close()
        self.upstreams.close()

    # ---- reconciling --------------------------------------------------------------------------

    def reconcile(self) -> None:
        store = self.ctx.store
        if not store.synced:
            return
        table = build_table(store.list("Gateway"), store.list("VirtualService"), self.cfg.labels)
        for problem in table.problems:
            if _once(("problem", problem)):
                log.warning("gateway: %s", problem)
        self.table = table
        self.addresses = self._addresses()
        wanted = {(ip, port) for ip in self.addresses for port in table.ports}
        self.listeners.reconcile(wanted)
        self.credentials.forget_others({(s.namespace, s.tls.credential_name)
                                        for spec in table.ports.values() for s in spec.servers
                                        if s.tls is not None})
        self.tls_errors = self._check_credentials(table)
        self.reconciled = True

    def _check_credentials(self, table: Table) -> dict[str, str]:
        """Build every terminating server's context now, so a port whose TLS cannot be set up
        is reported (``/readyz``, the log) before a client finds out; its connections are
        refused either way, never served in plaintext."""
        errors = {}
        for port, spec in sorted(table.ports.items()):
            for server in spec.servers:
                if server.mode is None or server.mode is TLSMode.PASSTHROUGH:
                    continue
                try:
                    self.credentials.context_for(server)
                except CredentialError as e:
                    where = f"port {port} ({server.gateway} servers[{server.index}])"
                    errors[where] = str(e)
                    if _once(("cred", server.gateway, str(e))):
                        log.error("gateway %s port %d: %s", server.gateway, port, e)
        return errors

    def _addresses(self) -> list[str]:
        found = interface_addresses(netdev.addresses_by_device())
        return select_addresses(found, self.cfg.nic, self.cfg.includeIP, self.cfg.excludeIP)

    def view(self) -> dict[str, Any]:
        """``/debug/gateway``: ports, servers, hosts and routes, listeners and problems."""
        ports = {}
        for port, spec in sorted(self.table.ports.items()):
            ports[str(port)] = {
                "kind": spec.kind.value,
                "servers": [{"gateway": s.gateway, "protocol": s.protocol,
                             "hosts": list(s.hosts), "mode": s.mode.value if s.mode else None,
                             "credentialName": s.tls.credential_name if s.tls else ""}
                            for s in spec.servers],
                "hosts": {str(i): {h: [f"{r.source}:{r.name}" for r in
                                       (t.routes_for(h.replace("*", "x", 1)) or [])]
                                   for h in t.hosts()} for i, t in spec.http.items()},
                "tcp": [[f"{t.namespace}/{t.name}:{t.port}@{t.weight}" for t in r.targets]
                        for r in spec.tcp],
                "tls": [{"sni": list(r.sni_hosts),
                         "targets": [f"{t.namespace}/{t.name}:{t.port}@{t.weight}"
                                     for t in r.targets]} for r in spec.tls]}
        return {"gateways": self.table.gateways, "ports": ports,
                "listening": [f"{ip}:{port}" for ip, port in self.listeners.active],
                "listenErrors": {f"{ip}:{port}": e for (ip, port), e in
                                 self.listeners.errors.items()},
                "problems": self.table.problems, "tlsErrors": self.tls_errors,
                "addresses": self.addresses}

    # ---- connections --------------------------------------------------------------------------

    def _handle(self, sock: socket.socket, peer: tuple[str, int], port: int) -> None:
        spec = self.table.ports.get(port)
        ACTIVE.inc()
        outcome = "ok"
        try:
            if spec is None:
                outcome = "no_server"
            elif spec.kind is PortKind.HTTP:
                http.serve(sock, peer, lambda: self._spec(port, PortKind.HTTP), 0, "http",
                           self.upstreams, self.settings)
            elif spec.kind is PortKind.TCP:
                outcome = self._tcp(sock, peer, spec, spec.l4_target(spec.tcp, None,
                                                                     random.random()))
            else:
                outcome = self._tls(sock, peer, spec)
        except Exception:  # a connection's failure must not take the listener down
            outcome = "error"
            log.exception("gateway connection on port %d failed", port)
        finally:
            ACTIVE.dec()
            CONNECTIONS.labels(str(port), outcome).inc()
            sock.close()

    def _spec(self, port: int, kind: PortKind, server: ServerRef | None = None,
              index: int = 0) -> PortSpec | None:
        spec = self.table.ports.get(port)
        if spec is None or spec.kind is not kind:
            return None
        if server is not None and (index >= len(spec.servers) or spec.servers[index] != server):
            return None  # the server this connection was accepted for is gone
        return spec

    def _tcp(self, client: socket.socket, peer: tuple[str, int], spec: PortSpec,
             target: Target | None, first: bytes = b"") -> str:
        if target is None:
            return "no_route"
        upstream = self._dial(target, peer[0])
        if upstream is None:
            return "no_endpoint"
        try:
            tcp.splice(client, upstream, to_upstream=first,
                       idle_timeout=self.cfg.tcpIdleTimeout)
        finally:
            upstream.close()
        return "ok"

    def _dial(self, target: Target, client_ip: str) -> socket.socket | None:
        resolved = self.upstreams.resolve(target)
        if resolved is None:
            return None
        svc, sport = resolved
        backends = self.ctx.store.backends(svc, sport)
        balancer = self.balancers.get(svc, sport)
        excluded: set[Any] = set()
        for _ in range(min(len(backends), 3)):
            backend = balancer.pick(backends, client_ip, excluded)
            if backend is None:
                return None
            try:
                return self.dialer.dial_tcp(backend, self.cfg.connectTimeout)
            except UnavailableError:
                excluded.add(backend)
            finally:
                balancer.release(backend)
        return None

    def _tls(self, sock: socket.socket, peer: tuple[str, int], spec: PortSpec) -> str:
        found = _peek_sni(sock, self.cfg.handshakeTimeout)
        if found is None:
            return "not_tls"
        sni = found or None
        index = spec.server_for_sni(sni)
        if index is None:
            return "unknown_sni"
        server = spec.servers[index]
        if server.mode is TLSMode.PASSTHROUGH:
            return self._tcp(sock, peer, spec, spec.l4_target(spec.tls, sni, random.random()))
        try:
            context = self.credentials.context_for(server)
        except CredentialError as e:
            if _once(("cred", server.gateway, str(e))):
                log.error("gateway %s port %d: %s", server.gateway, spec.port, e)
            return "bad_credential"
        try:
            tls_sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            tls_sock.settimeout(self.cfg.handshakeTimeout)
            tls_sock.do_handshake()
        except (ssl.SSLError, OSError):
            return "handshake_failed"
        try:
            if server.protocol == "HTTPS":
                http.serve(tls_sock, peer, lambda: self._spec(spec.port, PortKind.TLS, server,
                                                              index),
                           index, "https", self.upstreams, self.settings, fast=False)
                return "ok"
            return self._tcp(tls_sock, peer, spec, spec.l4_target(spec.tcp, sni,
                                                                  random.random()))
        finally:
            tls_sock.close()


def _peek_sni(sock: socket.socket, timeout: float) -> str | None:
    """The SNI of the ClientHello waiting on ``sock`` ("" when none); None if not TLS."""
    seen = -1
    try:
        with gevent.Timeout(timeout, False):
            while True:
                sock.settimeout(timeout)
                data = sock.recv(MAX_HELLO, socket.MSG_PEEK)
                if not data:
                    return None
                result = client_hello_sni(data)
                if result.status is SniStatus.FOUND:
                    return result.name
                if result.status is SniStatus.NOT_TLS:
                    return None
                if len(data) == seen:
                    gevent.sleep(0.005)  # the rest of the hello is in flight; peek again
                seen = len(data)
    except OSError:
        return None
    return None


def build(ctx: "Context") -> GatewayModule:
    """The module factory named in ``agent.MODULES``."""
    return GatewayModule(ctx)


def _balancing(config: Config) -> EdgeProxy:
    """The proxy settings the gateway's balancers read: ``edgeGateway.loadBalancer`` (the Go
    EdgeMesh's key) when set, else ``edgeProxy.loadBalancer`` (which earlier releases of ours
    documented for the gateway too)."""
    proxy = config.modules.edgeProxy
    own = config.modules.edgeGateway.loadBalancer
    if own == LoadBalancer():
        return proxy
    return dataclasses.replace(proxy, loadBalancer=own)

