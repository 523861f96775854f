"""Istio ``networking.istio.io`` DestinationRule, Gateway and VirtualService (v1alpha3, v1beta1).

The three API versions share one schema (v1beta1 types are aliases of v1alpha3), so one parser
serves all. Only the fields EdgeMesh acts on are typed; JSON names are camelCase of the protos.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgemesh.errors import ManifestError
from edgemesh.meta.models import (
    ObjectMeta,
    _bool,
    _int,
    _list,
    _map,
    _str,
    _strmap,
    _strs,
    parse_meta,
)

# ---- DestinationRule --------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpCookie:
    name: str
    path: str = ""
    # seconds, as Envoy reads it: None (no ttl) = a request without the cookie is not given
    # one (no hash: any endpoint); 0 = a session cookie is generated; > 0 = with Max-Age
    ttl: float | None = None


@dataclass(frozen=True)
class ConsistentHashLB:
    """Exactly one key is set: header, cookie, source IP or query parameter."""
    http_header_name: str = ""
    http_cookie: HttpCookie | None = None
    use_source_ip: bool = False
    http_query_parameter_name: str = ""
    minimum_ring_size: int = 0

    @property
    def needs_http(self) -> bool:
        return bool(self.http_header_name or self.http_cookie or self.http_query_parameter_name)


@dataclass(frozen=True)
class LoadBalancerSettings:
    simple: str = ""  # RANDOM | ROUND_ROBIN | LEAST_REQUEST | PASSTHROUGH | "" (unset)
    consistent_hash: ConsistentHashLB | None = None


@dataclass(frozen=True)
class PortTrafficPolicy:
    port: int
    load_balancer: LoadBalancerSettings


@dataclass(frozen=True)
class DestinationRule:
    meta: ObjectMeta
    host: str
    load_balancer: LoadBalancerSettings | None = None
    port_level: tuple[PortTrafficPolicy, ...] = ()
    export_to: tuple[str, ...] = ()
    subsets: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()  # (name, labels)

    def policy_for(self, port: int) -> LoadBalancerSettings | None:
        for p in self.port_level:
            if p.port == port:
                return p.load_balancer
        return self.load_balancer


_SIMPLE = {"UNSPECIFIED": "", "RANDOM": "RANDOM", "ROUND_ROBIN": "ROUND_ROBIN",
           "LEAST_REQUEST": "LEAST_REQUEST", "LEAST_CONN": "LEAST_REQUEST",
           "PASSTHROUGH": "PASSTHROUGH"}


def parse_duration(text: Any, where: str) -> float:
    """Istio/protobuf duration ("1.5s", "10m", "1h", "100ms") → seconds."""
    if text is None or text == "":
        return 0.0
    if not isinstance(text, str):
        raise ManifestError(f"{where}: expected a duration like '10s', got {text!r}")
    units = (("ms", 0.001), ("us", 1e-6), ("ns", 1e-9), ("s", 1.0), ("m", 60.0), ("h", 3600.0))
    for suffix, scale in units:
        if text.endswith(suffix):
            try:
                return float(text[: -len(suffix)]) * scale
            except ValueError:
                break
    raise ManifestError(f"{where}: expected a duration like '10s', got {text!r}")


def _parse_lb(obj: dict[str, Any], where: str) -> LoadBalancerSettings | None:
    lb = _map(obj, "loadBalancer", where)
    if not lb:
        return None
    where += "loadBalancer."
    if "simple" in lb and "consistentHash" in lb:
        raise ManifestError(f"{where[:-1]}: only one of simple and consistentHash may be set")
    simple = _str(lb, "simple", where)
    if simple and simple not in _SIMPLE:
        raise ManifestError(f"{where}simple: unknown policy {simple!r}")
    ch = _map(lb, "consistentHash", where)
    chash = None
    if ch:
        w = where + "consistentHash."
        cookie = _map(ch, "httpCookie", w)
        chash = ConsistentHashLB(
            http_header_name=_str(ch, "httpHeaderName", w),
            http_cookie=HttpCookie(name=_str(cookie, "name", w + "httpCookie."),
                                   path=_str(cookie, "path", w + "httpCookie."),
                                   ttl=None if cookie.get("ttl") is None else
                                   parse_duration(cookie["ttl"], w + "httpCookie.ttl"))
            if cookie else None,
            use_source_ip=_bool(ch, "useSourceIp", w, False),
            http_query_parameter_name=_str(ch, "httpQueryParameterName", w),
            minimum_ring_size=_int(_map(ch, "ringHash", w), "minimumRingSize", w + "ringHash.") or
            _int(ch, "minimumRingSize", w) or 0)
        keys = sum(map(bool, (chash.http_header_name, chash.http_cookie, chash.use_source_ip,
                              chash.http_query_parameter_name)))
        if keys != 1:
            raise ManifestError(f"{w[:-1]}: exactly one hash key must be set")
        if chash.http_cookie and not chash.http_cookie.name:
            raise ManifestError(f"{w}httpCookie.name: required")
    return LoadBalancerSettings(simple=_SIMPLE.get(simple, ""), consistent_hash=chash)


def parse_destination_rule(obj: dict[str, Any]) -> DestinationRule:
    meta = parse_meta(obj)
    spec = _map(obj, "spec", "")
    host = _str(spec, "host", "spec.")
    if not host:
        raise ManifestError("spec.host: required")
    tp = _map(spec, "trafficPolicy", "spec.")
    port_level = []
    for i, p in enumerate(_list(tp, "portLevelSettings", "spec.trafficPolicy.")):
        w = f"spec.trafficPolicy.portLevelSettings[{i}]."
        number = _int(_map(p, "port", w), "number", w + "port.")
        lb = _parse_lb(p, w)
        if number and lb:
            port_level.append(PortTrafficPolicy(port=number, load_balancer=lb))
    subsets = tuple((_str(s, "name", "spec.subsets."),
                     tuple(sorted(_strmap(s, "labels", "spec.subsets.").items())))
                    for s in _list(spec, "subsets", "spec.") if isinstance(s, dict))
    return DestinationRule(meta=meta, host=host,
                           load_balancer=_parse_lb(tp, "spec.trafficPolicy."),
                           port_level=tuple(port_level),
                           export_to=_strs(spec, "exportTo", "spec."), subsets=subsets)


# ---- Gateway ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTLS:
    mode: str = "SIMPLE"  # SIMPLE | MUTUAL | PASSTHROUGH | AUTO_PASSTHROUGH | ...
    credential_name: str = ""
    https_redirect: bool = False
    min_protocol_version: str = ""
    max_protocol_version: str = ""
    cipher_suites: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    # never parsed: set by the gateway's compiler for a server whose port protocol is HTTP or
    # TCP although it names a credentialName (the Go EdgeMesh's shape), so that Go's rule on
    # client certificates applies (gateway/tls.py)
    go_compat: bool = False


@dataclass(frozen=True)
class GatewayServer:
    port: int
    protocol: str  # HTTP | HTTPS | TCP | TLS | GRPC | HTTP2 | ...
    port_name: str
    hosts: tuple[str, ...]
    bind: str = ""
    name: str = ""
    tls: ServerTLS | None = None


@dataclass(frozen=True)
class Gateway:
    meta: ObjectMeta
    selector: dict[str, str] = field(default_factory=dict)
    servers: tuple[GatewayServer, ...] = ()


def parse_gateway(obj: dict[str, Any]) -> Gateway:
    meta = parse_meta(obj)
    spec = _map(obj, "spec", "")
    servers = []
    for i, s in enumerate(_list(spec, "servers", "spec.")):
        w = f"spec.servers[{i}]."
        if not isinstance(s, dict):
            raise ManifestError(f"spec.servers[{i}]: expected a mapping")
        p = _map(s, "port", w)
        number = _int(p, "number", w + "port.")
        if not number or not 1 <= number <= 65535:
            raise ManifestError(f"{w}port.number: expected an integer 1-65535")
        protocol = _str(p, "protocol", w + "port.").upper()
        if not protocol:
            raise ManifestError(f"{w}port.protocol: required")
        tls = _map(s, "tls", w)
        servers.append(GatewayServer(
            port=number, protocol=protocol, port_name=_str(p, "name", w + "port."),
            hosts=_strs(s, "hosts", w), bind=_str(s, "bind", w), name=_str(s, "name", w),
            tls=ServerTLS(mode=_str(tls, "mode", w + "tls.", "SIMPLE"),
                          credential_name=_str(tls, "credentialName", w + "tls."),
                          https_redirect=_bool(tls, "httpsRedirect", w + "tls.", False),
                          min_protocol_version=_str(tls, "minProtocolVersion", w + "tls."),
                          max_protocol_version=_str(tls, "maxProtocolVersion", w + "tls."),
                          cipher_suites=_strs(tls, "cipherSuites", w + "tls."),
                          subject_alt_names=_strs(tls, "subjectAltNames", w + "tls."))
            if tls else None))
    return Gateway(meta=meta, selector=_strmap(spec, "selector", "spec."), servers=tuple(servers))


# ---- VirtualService ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StringMatch:
    kind: str  # exact | prefix | regex
    value: str


@dataclass(frozen=True)
class HTTPMatch:
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    query_params: tuple[tuple[str, StringMatch], ...] = ()
    port: int | None = None
    gateways: tuple[str, ...] = ()
    ignore_uri_case: bool = False


@dataclass(frozen=True)
class Destination:
    host: str
    subset: str = ""
    port: int | None = None


@dataclass(frozen=True)
class HeaderOps:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class Headers:
    request: HeaderOps = HeaderOps()
    response: HeaderOps = HeaderOps()


@dataclass(frozen=True)
class RouteDestination:
    destination: Destination
    weight: int = 0
    headers: Headers | None = None


@dataclass(frozen=True)
class HTTPRoute:
    name: str = ""
    match: tuple[HTTPMatch, ...] = ()
    route: tuple[RouteDestination, ...] = ()
    redirect: dict[str, Any] | None = None  # {uri, authority, port, scheme, redirectCode}
    direct_response: dict[str, Any] | None = None  # {status, body: {string|bytes}}
    rewrite_uri: str | None = None
    rewrite_authority: str | None = None
    timeout: float = 0.0
    retries_attempts: int = 0
    retries_per_try_timeout: float = 0.0
    retry_on: str = ""
    headers: Headers | None = None


@dataclass(frozen=True)
class L4Match:
    port: int | None = None
    sni_hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    destination_subnets: tuple[str, ...] = ()
    source_subnet: str = ""


@dataclass(frozen=True)
class L4Route:
    match: tuple[L4Match, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True)
class VirtualService:
    meta: ObjectMeta
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tcp: tuple[L4Route, ...] = ()
    tls: tuple[L4Route, ...] = ()
    export_to: tuple[str, ...] = ()


def _string_match(obj: Any, where: str) -> StringMatch | None:
    """``{exact|prefix|regex: value}``; ``{}`` or absent is no constraint
    (for a header: present)."""
    if obj is None or obj == {}:
        return None
    if not isinstance(obj, dict) or len(obj) != 1:
        raise ManifestError(f"{where}: expected one of exact, prefix, regex")
    ((kind, value),) = obj.items()
    if kind not in ("exact", "prefix", "regex") or not isinstance(value, str):
        raise ManifestError(f"{where}: expected one of exact, prefix, regex with a string")
    return StringMatch(kind, value)


def _match_map(obj: dict[str, Any], key: str, where: str) -> tuple[tuple[str, StringMatch], ...]:
    out = []
    for name, m in _map(obj, key, where).items():
        sm = _string_match(m, f"{where}{key}.{name}")
        if sm is None:
            sm = StringMatch("present", "")
        out.append((name.lower() if key != "queryParams" else name, sm))
    return tuple(out)


def _header_ops(obj: dict[str, Any], where: str) -> HeaderOps:
    return HeaderOps(set=tuple(_strmap(obj, "set", where).items()),
                     add=tuple(_strmap(obj, "add", where).items()),
                     remove=_strs(obj, "remove", where))


def _headers(obj: dict[str, Any], where: str) -> Headers | None:
    h = _map(obj, "headers", where)
    if not h:
        return None
    return Headers(request=_header_ops(_map(h, "request", where), where + "headers.request."),
                   response=_header_ops(_map(h, "response", where), where + "headers.response."))


def _route_destinations(obj: dict[str, Any], where: str) -> tuple[RouteDestination, ...]:
    out = []
    for i, r in enumerate(_list(obj, "route", where)):
        w = f"{where}route[{i}]."
        d = _map(r, "destination", w)
        host = _str(d, "host", w + "destination.")
        if not host:
            raise ManifestError(f"{w}destination.host: required")
        port = _int(_map(d, "port", w + "destination."), "number", w + "destination.port.")
        out.append(RouteDestination(
            destination=Destination(host=host, subset=_str(d, "subset", w + "destination."),
                                    port=port),
            weight=_int(r, "weight", w, 0) or 0, headers=_headers(r, w)))
    return tuple(out)


def _http_route(r: Any, where: str) -> HTTPRoute:
    if not isinstance(r, dict):
        raise ManifestError(f"{where[:-1]}: expected a mapping")
    matches = []
    for i, m in enumerate(_list(r, "match", where)):
        w = f"{where}match[{i}]."
        if not isinstance(m, dict):
            raise ManifestError(f"{w[:-1]}: expected a mapping")
        matches.append(HTTPMatch(
            uri=_string_match(m.get("uri"), w + "uri"),
            scheme=_string_match(m.get("scheme"), w + "scheme"),
            method=_string_match(m.get("method"), w + "method"),
            authority=_string_match(m.get("authority"), w + "authority"),
            headers=_match_map(m, "headers", w),
            without_headers=_match_map(m, "withoutHeaders", w),
            query_params=_match_map(m, "queryParams", w),
            port=_int(m, "port", w), gateways=_strs(m, "gateways", w),
            ignore_uri_case=_bool(m, "ignoreUriCase", w, False)))
    rewrite = _map(r, "rewrite", where)
    retries = _map(r, "retries", where)
    return HTTPRoute(
        name=_str(r, "name", where), match=tuple(matches),
        route=_route_destinations(r, where),
        redirect=_map(r, "redirect", where) or None,
        direct_response=_map(r, "directResponse", where) or None,
        rewrite_uri=_str(rewrite, "uri", where + "rewrite.") if "uri" in rewrite else None,
        rewrite_authority=_str(rewrite, "authority", where + "rewrite.")
        if "authority" in rewrite else None,
        timeout=parse_duration(r.get("timeout"), where + "timeout"),
        retries_attempts=_int(retries, "attempts", where + "retries.", 0) or 0,
        retries_per_try_timeout=parse_duration(retries.get("perTryTimeout"),
                                               where + "retries.perTryTimeout"),
        retry_on=_str(retries, "retryOn", where + "retries."),
        headers=_headers(r, where))


def _l4_route(r: Any, where: str) -> L4Route:
    if not isinstance(r, dict):
        raise ManifestError(f"{where[:-1]}: expected a mapping")
    matches = tuple(L4Match(port=_int(m, "port", where), sni_hosts=_strs(m, "sniHosts", where),
                            gateways=_strs(m, "gateways", where),
                            destination_subnets=_strs(m, "destinationSubnets", where),
                            source_subnet=_str(m, "sourceSubnet", where))
                    for m in _list(r, "match", where) if isinstance(m, dict))
    return L4Route(match=matches, route=_route_destinations(r, where))


def parse_virtual_service(obj: dict[str, Any]) -> VirtualService:
    meta = parse_meta(obj)
    spec = _map(obj, "spec", "")
    return VirtualService(
        meta=meta, hosts=_strs(spec, "hosts", "spec."), gateways=_strs(spec, "gateways", "spec."),
        http=tuple(_http_route(r, f"spec.http[{i}].")
                   for i, r in enumerate(_list(spec, "http", "spec."))),
        tcp=tuple(_l4_route(r, f"spec.tcp[{i}].")
                  for i, r in enumerate(_list(spec, "tcp", "spec."))),
        tls=tuple(_l4_route(r, f"spec.tls[{i}].")
                  for i, r in enumerate(_list(spec, "tls", "spec."))),
        export_to=_strs(spec, "exportTo", "spec."))
