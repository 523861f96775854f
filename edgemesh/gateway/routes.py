"""The gateway's route table, sans-IO: ports, servers, routes, and the decision per request.

``compile.build_table(gateways, virtual_services, labels)`` turns the Istio objects into one
``PortSpec`` per listening port; ``PortSpec.decide(request, rnd)`` turns the facts of one HTTP
request into an ``Action`` (forward, redirect, direct response, not found). Nothing here
touches a socket; the I/O shells (``http.py``, ``tcp.py``) feed it and act on what it returns.

Semantics (what Istio users expect, where the Go EdgeMesh gateway did less):

- A Gateway applies when every ``spec.selector`` label is among this gateway's own labels
  (config ``modules.edgeGateway.labels``); an empty selector applies to every gateway.
- Server hosts may carry a namespace (``ns/host``, ``./host`` = the Gateway's, ``*/host``);
  only VirtualServices of that namespace then bind.
- A VirtualService binds to a Gateway named in ``spec.gateways`` as ``name`` (its own
  namespace), ``namespace/name`` or ``name.namespace.svc.<zone>``; ``http[].match[].gateways``
  narrows a match further. Its hosts are intersected with the server's hosts.
- A request's host picks routes by the most specific host: exact, then the longest ``*.``
  wildcard suffix, then ``*``. Routes (of all VirtualServices for that host, in name order)
  are tried in order; a route matches when any of its matches does (all conditions ANDed).
- Routes see the normalised request (``request_for``, by ``proxy.http_target``): the path with
  dot segments removed, unreserved escapes decoded and slashes merged (Istio's ``BASE`` plus
  ``MERGE_SLASHES``; ``%2F`` kept), the absolute URI's authority over ``Host``; so no spelling
  of a path or authority steps around a route, and the endpoint gets what was matched.
- ``regex`` matches are full matches in linear time (``linear_re``, RE2 semantics): a pattern
  from a manifest cannot make a request stall the process; backreferences and lookarounds are
  reported as problems, as RE2 refuses them.
- Several servers may share a port when their protocols agree (HTTPS and TLS may mix, chosen
  by SNI); a server whose port is taken by another protocol is reported as a conflict.
"""
from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from edgemesh.gateway.linear_re import LinearPattern
from edgemesh.meta.istio import Headers, ServerTLS, StringMatch
from edgemesh.proxy.http_target import normalize_request

ZONE = "cluster.local"
HTTP_PROTOCOLS = ("HTTP", "HTTP2", "GRPC", "GRPC-WEB")  # served as HTTP/1.1
DEFAULT_RETRY_ATTEMPTS = 2  # Istio's default retry policy


class PortKind(enum.Enum):
    HTTP = "HTTP"  # plain HTTP routing
    TLS = "TLS"  # HTTPS/TLS servers: SNI picks a server, which terminates or passes through
    TCP = "TCP"  # tcp routes by port


class TLSMode(enum.Enum):
    SIMPLE = "SIMPLE"
    MUTUAL = "MUTUAL"
    PASSTHROUGH = "PASSTHROUGH"


# ---- matching primitives ----------------------------------------------------------------------


@dataclass(frozen=True)
class Matcher:
    """One StringMatch, compiled: exact, prefix, regex (full match in linear time, as RE2 in
    Envoy: ``linear_re``), present."""
    kind: str
    value: str
    regex: LinearPattern | None = None
    ignore_case: bool = False

    def __call__(self, text: str | None) -> bool:
        if text is None:
            return False
        if self.kind == "present":
            return True
        if self.ignore_case:
            text = text.lower()
        if self.kind == "exact":
            return text == self.value
        if self.kind == "prefix":
            return text.startswith(self.value)
        assert self.regex is not None
        return self.regex.fullmatch(text)


def compile_match(sm: StringMatch, ignore_case: bool = False) -> Matcher:
    """A Matcher for ``sm``; raises ``re.error`` for a bad regex, or one the gateway will not
    run (``linear_re.UnsupportedPattern``: backreferences, lookarounds, too large), which the
    caller reports as a problem of the route, logged once."""
    value = sm.value.lower() if ignore_case and sm.kind != "regex" else sm.value
    regex = LinearPattern(sm.value, re.IGNORECASE if ignore_case else 0) \
        if sm.kind == "regex" else None
    return Matcher(sm.kind, value, regex, ignore_case and sm.kind != "regex")


def host_matches(pattern: str, host: str) -> bool:
    """``*`` matches anything; ``*.example.com`` any name ending in ``.example.com``."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def covers(pattern: str, other: str) -> bool:
    """Every name ``other`` (a name or a pattern) matches is matched by ``pattern``."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return other != "*" and other.endswith(pattern[1:])
    return pattern == other


def intersect_hosts(a: str, b: str) -> str | None:
    """The more specific of two host patterns when one covers the other, else None."""
    if covers(a, b):
        return b
    if covers(b, a):
        return a
    return None


# ---- compiled routes --------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A weighted destination: a Service by namespace and name, and a port number if given."""
    namespace: str
    name: str
    port: int | None
    weight: int
    headers: Headers | None = None
    host: str = ""  # as written in the VirtualService (for errors and the debug view)


@dataclass(frozen=True)
class CompiledMatch:
    uri: Matcher | None = None
    method: Matcher | None = None
    authority: Matcher | None = None
    scheme: Matcher | None = None
    headers: tuple[tuple[str, Matcher], ...] = ()
    without_headers: tuple[tuple[str, Matcher], ...] = ()
    query: tuple[tuple[str, Matcher], ...] = ()
    port: int | None = None

    def __call__(self, req: "Request") -> bool:
        if self.port is not None and req.port != self.port:
            return False
        for m, text in ((self.uri, req.path), (self.method, req.method),
                        (self.authority, req.authority), (self.scheme, req.scheme)):
            if m is not None and not m(text):
                return False
        for name, m in self.headers:
            if not m(req.headers.get(name)):
                return False
        for name, m in self.without_headers:
            if m(req.headers.get(name)):
                return False
        if self.query:
            params = req.query_params
            return all(m(params.get(name)) for name, m in self.query)
        return True


@dataclass(frozen=True)
class Redirect:
    uri: str | None = None
    authority: str | None = None
    port: int | None = None
    scheme: str | None = None
    status: int = 301


@dataclass(frozen=True)
class Route:
    """One ``http[]`` entry of a VirtualService, compiled."""
    source: str  # namespace/name of the VirtualService, for metrics and the debug view
    name: str
    matches: tuple[CompiledMatch, ...]
    targets: tuple[Target, ...] = ()
    redirect: Redirect | None = None
    direct_status: int = 0
    direct_body: bytes = b""
    rewrite_uri: str | None = None
    rewrite_authority: str | None = None
    timeout: float = 0.0
    attempts: int = DEFAULT_RETRY_ATTEMPTS
    per_try_timeout: float = 0.0
    retry_on: frozenset[str] = frozenset({"connect-failure", "refused-stream", "unavailable",
                                          "cancelled", "503"})
    headers: Headers | None = None

    def matching(self, req: "Request") -> CompiledMatch | None:
        """The first match that accepts ``req`` (an always-true one when there are none)."""
        if not self.matches:
            return _MATCH_ALL
        for m in self.matches:
            if m(req):
                return m
        return None


_MATCH_ALL = CompiledMatch()


@dataclass(frozen=True)
class L4Rule:
    """A tcp[] or tls[] route: match by port and/or SNI hosts, then weighted targets."""
    source: str
    ports: frozenset[int]  # empty: any port
    sni_hosts: tuple[str, ...]  # empty: any (tcp routes)
    targets: tuple[Target, ...]

    def accepts(self, port: int, sni: str | None) -> bool:
        if self.ports and port not in self.ports:
            return False
        if not self.sni_hosts:
            return True
        return sni is not None and any(host_matches(h, sni) for h in self.sni_hosts)


# ---- request facts and actions ----------------------------------------------------------------


@dataclass
class Request:
    """What routing needs to know about one HTTP request (header names lower-case).

    ``target`` and ``host`` are the normalised ones (``request_for`` makes them from what the
    client sent): routes match, rewrite and redirect on what the endpoint will receive."""
    method: str
    target: str  # origin-form: normalised path, then "?query" as sent
    host: str  # the effective authority, host lower-case, port included if one was given
    headers: Mapping[str, str]
    scheme: str = "http"
    port: int = 80
    _query: dict[str, str] | None = field(default=None, repr=False)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query_string(self) -> str:
        return self.target.partition("?")[2]

    @property
    def authority(self) -> str:
        return self.host

    @property
    def hostname(self) -> str:
        """The host without its port, lower-case (IPv6 brackets kept)."""
        host = self.host.lower()
        if host.startswith("["):
            return host.partition("]")[0] + "]"
        return host.rpartition(":")[0] if ":" in host else host

    @property
    def query_params(self) -> dict[str, str]:
        if self._query is None:
            from urllib.parse import parse_qsl
            self._query = {}
            for k, v in parse_qsl(self.query_string, keep_blank_values=True):
                self._query.setdefault(k, v)
        return self._query


def request_for(method: str, target: bytes, host: bytes | None, headers: Mapping[str, str],
                scheme: str = "http", port: int = 80) -> Request:
    """The routing facts of a request as sent (``host``: its Host field, None if it had none):
    target normalised and authority chosen by ``http_target.normalize_request``, which raises
    ``TargetError`` (400) for a target or authority that cannot be routed safely."""
    t = normalize_request(target, host)
    authority = t.authority.text().decode("ascii") if t.authority is not None else ""
    return Request(method, t.origin.decode("latin-1"), authority, headers, scheme, port)


@dataclass(frozen=True)
class Forward:
    route: Route
    target: Target
    path: str  # request-target to send upstream (rewritten)
    authority: str  # Host to send upstream (rewritten)


@dataclass(frozen=True)
class SendRedirect:
    status: int
    location: str
    route: Route


@dataclass(frozen=True)
class SendDirect:
    status: int
    body: bytes
    route: Route


@dataclass(frozen=True)
class NotFound:
    reason: str


Action = Forward | SendRedirect | SendDirect | NotFound


def choose_target(targets: tuple[Target, ...], rnd: float) -> Target | None:
    """The target that ``rnd`` in [0, 1) falls on, by weight (equal shares if none weighted)."""
    if not targets:
        return None
    total = sum(t.weight for t in targets)
    if total <= 0:
        return targets[min(int(rnd * len(targets)), len(targets) - 1)]
    point = rnd * total
    for t in targets:
        if point < t.weight:
            return t
        point -= t.weight
    return next(t for t in reversed(targets) if t.weight > 0)


def rewritten_path(route: Route, match: CompiledMatch, target: str) -> str:
    """``rewrite.uri`` replaces the matched prefix (prefix matches) or the whole path."""
    if route.rewrite_uri is None:
        return target
    path, sep, query = target.partition("?")
    if match.uri is not None and match.uri.kind == "prefix":
        rest = path[len(match.uri.value):]
        new = route.rewrite_uri + rest
        if route.rewrite_uri.endswith("/") and rest.startswith("/"):
            new = route.rewrite_uri + rest[1:]
        new = new or "/"
    else:
        new = route.rewrite_uri
    return new + sep + query


def redirect_location(r: Redirect, req: Request) -> str:
    """The Location of an HTTPRedirect: each part replaced only when the redirect gives it."""
    scheme = r.scheme or req.scheme
    host = r.authority or req.hostname
    port = r.port
    authority = host if port is None else f"{host}:{port}"
    if r.authority is None and port is None and ":" in req.host and not req.host.endswith("]"):
        authority = req.host if r.scheme is None else host
    if r.uri is None:
        uri = req.target
    else:
        uri = r.uri if "?" in r.uri or not req.query_string else f"{r.uri}?{req.query_string}"
    return f"{scheme}://{authority}{uri}"


# ---- host table and port specs ----------------------------------------------------------------


@dataclass
class HostTable:
    """Routes by request host: exact names, ``*.`` suffixes (longest first), then ``*``."""
    exact: dict[str, list[Route]] = field(default_factory=dict)
    wildcard: list[tuple[str, list[Route]]] = field(default_factory=list)
    star: list[Route] | None = None

    def add(self, host: str, routes: Iterable[Route]) -> None:
        host = host.lower()
        if host == "*":
            self.star = (self.star or []) + list(routes)
        elif host.startswith("*."):
            for suffix, existing in self.wildcard:
                if suffix == host[1:]:
                    existing.extend(routes)
                    return
            self.wildcard.append((host[1:], list(routes)))
            self.wildcard.sort(key=lambda e: -len(e[0]))
        else:
            self.exact.setdefault(host, []).extend(routes)

    def routes_for(self, hostname: str) -> list[Route] | None:
        found = self.exact.get(hostname)
        if found is not None:
            return found
        for suffix, routes in self.wildcard:
            if hostname.endswith(suffix):
                return routes
        return self.star

    def hosts(self) -> list[str]:
        return [*self.exact, *("*" + s for s, _ in self.wildcard), *(["*"] if self.star else [])]


@dataclass(frozen=True)
class ServerRef:
    """One Gateway server as a port sees it (its TLS settings and where its Secret lives)."""
    gateway: str  # namespace/name
    namespace: str
    index: int
    protocol: str
    hosts: tuple[str, ...]  # without namespace prefixes
    tls: ServerTLS | None

    @property
    def mode(self) -> TLSMode | None:
        if self.protocol not in ("HTTPS", "TLS"):
            return None
        raw = (self.tls.mode if self.tls else "SIMPLE").upper()
        return TLSMode.__members__.get(raw, TLSMode.SIMPLE) \
            if raw != "OPTIONAL_MUTUAL" else TLSMode.MUTUAL

    def serves(self, sni: str | None) -> bool:
        if sni is None:
            return "*" in self.hosts
        return any(host_matches(h, sni.lower()) for h in self.hosts)


@dataclass
class PortSpec:
    """Everything one listening port does."""
    port: int
    kind: PortKind
    servers: list[ServerRef] = field(default_factory=list)
    http: dict[int, HostTable] = field(default_factory=dict)  # server index in .servers → hosts
    tcp: list[L4Rule] = field(default_factory=list)  # tcp routes (TCP and terminated TLS)
    tls: list[L4Rule] = field(default_factory=list)  # tls routes (PASSTHROUGH servers)
    https_redirect: bool = False

    def server_for_sni(self, sni: str | None) -> int | None:
        """Index of the server an SNI name selects: exact host, then wildcard, then ``*``."""
        best: tuple[int, int] | None = None
        for i, s in enumerate(self.servers):
            for h in s.hosts:
                if sni is None and h != "*":
                    continue
                if sni is not None and not host_matches(h, sni.lower()):
                    continue
                rank = 0 if h == sni else (2 if h == "*" else 1)
                if best is None or rank < best[0]:
                    best = (rank, i)
        if best is None and sni is None and self.servers:
            return 0  # clients without SNI get the first server, as Envoy's default chain
        return best[1] if best else None

    def decide(self, req: Request, rnd: float, server: int = 0) -> Action:
        """What to do with ``req`` arriving on server ``server`` of this port."""
        if self.https_redirect and req.scheme == "http":
            loc = redirect_location(Redirect(scheme="https", port=None), req)
            return SendRedirect(301, loc, _REDIRECT_ROUTE)
        table = self.http.get(server)
        if table is None:
            return NotFound("no routes on this server")
        routes = table.routes_for(req.hostname)
        if routes is None:
            return NotFound(f"no virtual host for {req.hostname!r}")
        for route in routes:
            m = route.matching(req)
            if m is None:
                continue
            return _act(route, m, req, rnd)
        return NotFound("no route matched")

    def l4_target(self, rules: list[L4Rule], sni: str | None, rnd: float) -> Target | None:
        for rule in rules:
            if rule.accepts(self.port, sni):
                return choose_target(rule.targets, rnd)
        return None


_REDIRECT_ROUTE = Route(source="", name="httpsRedirect", matches=())


def _act(route: Route, m: CompiledMatch, req: Request, rnd: float) -> Action:
    if route.redirect is not None:
        return SendRedirect(route.redirect.status, redirect_location(route.redirect, req), route)
    if route.direct_status:
        return SendDirect(route.direct_status, route.direct_body, route)
    target = choose_target(route.targets, rnd)
    if target is None:
        return NotFound("route has no destination")
    return Forward(route, target, rewritten_path(route, m, req.target),
                   route.rewrite_authority or req.host)


@dataclass
class Table:
    """The whole gateway: port specs, and problems found while building (for the debug view)."""
    ports: dict[int, PortSpec] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)  # namespace/name of those that apply

