"""Compile Istio Gateways and VirtualServices into the gateway's ``Table`` (sans-IO).

See ``routes.py`` for the semantics. Problems (a bad regex, a port claimed by two protocols, a
destination outside the cluster) never stop the build: the offending piece is left out and the
problem listed in ``Table.problems``, which the debug view shows.
"""
from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from edgemesh.gateway.ciphers import choose
from edgemesh.gateway.routes import (
    HTTP_PROTOCOLS,
    ZONE,
    CompiledMatch,
    HostTable,
    L4Rule,
    PortKind,
    PortSpec,
    Redirect,
    Route,
    ServerRef,
    Table,
    Target,
    compile_match,
    intersect_hosts,
)
from edgemesh.meta.istio import (
    Gateway,
    GatewayServer,
    HTTPMatch,
    HTTPRoute,
    L4Route,
    RouteDestination,
    VirtualService,
)

SUPPORTED = (*HTTP_PROTOCOLS, "HTTPS", "TLS", "TCP")


def selects(gateway: Gateway, labels: Mapping[str, str]) -> bool:
    """Every selector label is one of ours (an empty selector selects every gateway)."""
    return all(labels.get(k) == v for k, v in gateway.selector.items())


def binds(vs: VirtualService, gw: Gateway, refs: Iterable[str] | None = None) -> bool:
    """``vs`` (or one of its matches, given ``refs``) names ``gw``."""
    ns, name = gw.meta.namespace, gw.meta.name
    for ref in (vs.gateways if refs is None else refs):
        if ref in (f"{ns}/{name}", f"{name}.{ns}.svc.{ZONE}") or \
                (ref == name and vs.meta.namespace == ns):
            return True
    return False


def resolve_host(host: str, namespace: str) -> tuple[str, str] | None:
    """A destination host → (namespace, service name); None for names outside the cluster."""
    host = host.rstrip(".").lower()
    if host.endswith(f".svc.{ZONE}"):
        host = host[: -len(f".{ZONE}")]
    parts = host.split(".")
    if len(parts) == 1:
        return namespace, parts[0]
    if len(parts) == 2 or (len(parts) == 3 and parts[2] == "svc"):
        return parts[1], parts[0]
    return None


def _split_server_host(host: str, gw_ns: str) -> tuple[str, str]:
    """``ns/host`` → (namespace or "*", host); ``./host`` means the Gateway's namespace."""
    if "/" not in host:
        return "*", host.lower()
    ns, _, h = host.partition("/")
    return (gw_ns if ns == "." else ns), h.lower()


def build_table(gateways: Iterable[Gateway], virtual_services: Iterable[VirtualService],
                labels: Mapping[str, str]) -> Table:
    """The whole route table for a gateway with ``labels``."""
    table = Table()
    chosen = sorted((g for g in gateways if selects(g, labels)),
                    key=lambda g: (g.meta.namespace, g.meta.name))
    services = sorted(virtual_services, key=lambda v: (v.meta.namespace, v.meta.name))
    for gw in chosen:
        table.gateways.append(f"{gw.meta.namespace}/{gw.meta.name}")
        bound = [v for v in services if binds(v, gw)]
        for i, server in enumerate(gw.servers):
            _add_server(table, gw, i, server, bound)
    return table


def _add_server(table: Table, gw: Gateway, index: int, server: GatewayServer,
                bound: list[VirtualService]) -> None:
    where = f"Gateway {gw.meta.namespace}/{gw.meta.name} servers[{index}]"
    server = _go_shape(server, where, table)
    protocol = server.protocol.upper()
    if protocol not in SUPPORTED:
        table.problems.append(f"{where}: protocol {protocol} is not supported")
        return
    kind = PortKind.HTTP if protocol in HTTP_PROTOCOLS else \
        PortKind.TCP if protocol == "TCP" else PortKind.TLS
    spec = table.ports.get(server.port)
    if spec is None:
        spec = table.ports[server.port] = PortSpec(port=server.port, kind=kind)
    elif spec.kind is not kind:
        table.problems.append(f"{where}: port {server.port} is already {spec.kind.value}; "
                              f"{protocol} server left out")
        return
    hosts = [_split_server_host(h, gw.meta.namespace) for h in server.hosts] or [("*", "*")]
    ref = ServerRef(gateway=f"{gw.meta.namespace}/{gw.meta.name}", namespace=gw.meta.namespace,
                    index=index, protocol=protocol, hosts=tuple(h for _, h in hosts),
                    tls=server.tls)
    if ref.mode is not None and ref.mode.value != "PASSTHROUGH" and \
            not (server.tls and server.tls.credential_name):
        table.problems.append(f"{where}: tls.credentialName is required for {ref.mode.value}")
        return
    if ref.mode is not None and ref.mode.value != "PASSTHROUGH" and server.tls is not None:
        table.problems.extend(f"{where}: tls.cipherSuites: {p}"
                              for p in choose(server.tls.cipher_suites).problems)
    position = len(spec.servers)
    spec.servers.append(ref)
    if kind is PortKind.HTTP and server.tls is not None and server.tls.https_redirect:
        spec.https_redirect = True
    for vs in bound:
        _bind(table, spec, position, ref, hosts, gw, vs)


def _go_shape(server: GatewayServer, where: str, table: Table) -> GatewayServer:
    """A plain HTTP or TCP server naming a ``tls.credentialName`` terminates TLS with it, as
    the Go EdgeMesh did whatever the protocol said (its HTTPS example says ``HTTP``): it is
    served as HTTPS (TCP: TLS), in SIMPLE or MUTUAL mode, and the disagreement is reported.
    An Istio ``httpsRedirect`` server keeps its meaning."""
    tls = server.tls
    protocol = server.protocol.upper()
    if tls is None or not tls.credential_name or tls.https_redirect or \
            protocol not in (*HTTP_PROTOCOLS, "TCP"):
        return server
    served = "TLS" if protocol == "TCP" else "HTTPS"
    table.problems.append(
        f"{where}: port.protocol {protocol} disagrees with tls.credentialName "
        f"{tls.credential_name}: TLS is terminated with that Secret as the Go EdgeMesh did "
        f"(served as {served}; say protocol: {served})")
    mode = tls.mode.upper() if tls.mode.upper() in ("MUTUAL", "OPTIONAL_MUTUAL") else "SIMPLE"
    return replace(server, protocol=served, tls=replace(tls, mode=mode, go_compat=True))


def _bind(table: Table, spec: PortSpec, position: int, ref: ServerRef,
          hosts: list[tuple[str, str]], gw: Gateway, vs: VirtualService) -> None:
    ns = vs.meta.namespace
    effective = []
    for host_ns, server_host in hosts:
        if host_ns not in ("*", ns):
            continue
        for vh in vs.hosts or ("*",):
            both = intersect_hosts(server_host, vh.lower())
            if both is not None and both not in effective:
                effective.append(both)
    if not effective:
        return
    source = f"{ns}/{vs.meta.name}"
    terminated_tls = spec.kind is PortKind.TLS and ref.mode is not None and \
        ref.mode.value != "PASSTHROUGH"
    if spec.kind is PortKind.HTTP or (terminated_tls and ref.protocol == "HTTPS"):
        routes = _http_routes(table, vs, gw, source)
        if routes:
            # plain HTTP servers on one port share one host table, as Envoy merges them
            table_for = spec.http.setdefault(position if terminated_tls else 0, HostTable())
            for host in effective:
                table_for.add(host, routes)
    elif spec.kind is PortKind.TCP or terminated_tls:
        spec.tcp.extend(_l4_rules(table, vs.tcp, gw, vs, source, use_sni=False))
    else:
        rules = _l4_rules(table, vs.tls, gw, vs, source, use_sni=True)
        spec.tls.extend(rules)


def _targets(table: Table, dests: tuple[RouteDestination, ...], ns: str,
             where: str) -> tuple[Target, ...]:
    out = []
    for i, d in enumerate(dests):
        resolved = resolve_host(d.destination.host, ns)
        if resolved is None:
            table.problems.append(f"{where}.route[{i}]: destination {d.destination.host!r} is "
                                  f"not a Service of this cluster")
            continue
        weight = d.weight if len(dests) > 1 else max(d.weight, 100)
        out.append(Target(namespace=resolved[0], name=resolved[1], port=d.destination.port,
                          weight=weight, headers=d.headers, host=d.destination.host))
    return tuple(out)


def _http_routes(table: Table, vs: VirtualService, gw: Gateway, source: str) -> list[Route]:
    routes = []
    for i, r in enumerate(vs.http):
        where = f"VirtualService {source} http[{i}]"
        try:
            route = _http_route(table, r, vs, gw, source, where)
        except re.error as e:
            table.problems.append(f"{where}: bad regex: {e}")
            continue
        if route is not None:
            routes.append(route)
    return routes


def _http_route(table: Table, r: HTTPRoute, vs: VirtualService, gw: Gateway, source: str,
                where: str) -> Route | None:
    matches = [m for m in r.match if not m.gateways or binds(vs, gw, m.gateways)]
    if r.match and not matches:
        return None  # every match names other gateways
    targets = _targets(table, r.route, vs.meta.namespace, where)
    redirect = _redirect(r.redirect, table, where) if r.redirect else None
    status, body = _direct(r.direct_response, table, where) if r.direct_response else (0, b"")
    if not targets and redirect is None and not status:
        table.problems.append(f"{where}: no usable destination, redirect or directResponse")
    retry_on = frozenset(p.strip() for p in r.retry_on.split(",") if p.strip())
    kwargs: dict[str, Any] = {}
    if r.retries_attempts or r.retry_on:
        kwargs["attempts"] = r.retries_attempts
    if retry_on:
        kwargs["retry_on"] = retry_on
    return Route(source=source, name=r.name, matches=tuple(_compile(m) for m in matches),
                 targets=targets, redirect=redirect, direct_status=status, direct_body=body,
                 rewrite_uri=r.rewrite_uri, rewrite_authority=r.rewrite_authority,
                 timeout=r.timeout, per_try_timeout=r.retries_per_try_timeout,
                 headers=r.headers, **kwargs)


def _compile(m: HTTPMatch) -> CompiledMatch:
    def table_of(items: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
        return tuple((name, compile_match(sm)) for name, sm in items)
    return CompiledMatch(
        uri=compile_match(m.uri, m.ignore_uri_case) if m.uri else None,
        method=compile_match(m.method) if m.method else None,
        authority=compile_match(m.authority) if m.authority else None,
        scheme=compile_match(m.scheme) if m.scheme else None,
        headers=table_of(m.headers), without_headers=table_of(m.without_headers),
        query=table_of(m.query_params), port=m.port)


def _redirect(raw: dict[str, Any], table: Table, where: str) -> Redirect | None:
    code = raw.get("redirectCode", 301)
    port = raw.get("port")
    if not isinstance(code, int) or code not in (301, 302, 303, 307, 308) or \
            (port is not None and not isinstance(port, int)):
        table.problems.append(f"{where}.redirect: bad redirectCode or port")
        return None
    def text(key: str) -> str | None:
        value = raw.get(key)
        return value if isinstance(value, str) and value else None
    return Redirect(uri=text("uri"), authority=text("authority"), port=port,
                    scheme=text("scheme"), status=code)


def _direct(raw: dict[str, Any], table: Table, where: str) -> tuple[int, bytes]:
    status = raw.get("status")
    if not isinstance(status, int) or not 200 <= status <= 599:
        table.problems.append(f"{where}.directResponse.status: expected 200-599")
        return 0, b""
    body = raw.get("body") or {}
    if isinstance(body, dict) and isinstance(body.get("string"), str):
        return status, body["string"].encode()
    if isinstance(body, dict) and isinstance(body.get("bytes"), str):
        try:
            return status, base64.b64decode(body["bytes"], validate=True)
        except (binascii.Error, ValueError):
            table.problems.append(f"{where}.directResponse.body.bytes: not base64")
    return status, b""


def _l4_rules(table: Table, routes: tuple[L4Route, ...], gw: Gateway, vs: VirtualService,
              source: str, use_sni: bool) -> list[L4Rule]:
    rules = []
    for i, r in enumerate(routes):
        where = f"VirtualService {source} {'tls' if use_sni else 'tcp'}[{i}]"
        matches = [m for m in r.match if not m.gateways or binds(vs, gw, m.gateways)]
        if r.match and not matches:
            continue
        targets = _targets(table, r.route, vs.meta.namespace, where)
        if not targets:
            continue
        if not matches:
            rules.append(L4Rule(source, frozenset(), tuple(vs.hosts) if use_sni else (),
                                targets))
        for m in matches:
            sni = tuple(h.lower() for h in m.sni_hosts) if use_sni else ()
            rules.append(L4Rule(source, frozenset([m.port]) if m.port else frozenset(), sni,
                                targets))
    return rules
