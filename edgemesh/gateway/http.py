"""The gateway's HTTP/1.1 router for the proxy's HTTP engine (``edgemesh.proxy.http``).

The engine reads, frames and relays; ``GatewayRouter.decide`` asks the route table
(``routes.PortSpec.decide``) about each request and turns its action into the engine's terms:
routes match on the normalised request (``http_target``: dot segments removed, slashes merged,
the authority of an absolute URI preferred to ``Host``), and that is what goes upstream: an
origin-form request line with the normalised (then rewritten) path, ``Host`` = the effective
(or rewritten) authority. Other bytes pass through untouched except the fields the route
changes (header operations) and ``X-Forwarded-For`` / ``X-Forwarded-Proto``.
Errors a client sees:

- 400/431/501 malformed or oversized heads (the parser's hint), 408 a head not received in
  ``requestHeaderTimeout``, 413 a body over ``maxRequestBodyBytes``;
- 400 a request-target or authority ``http_target`` refuses (an absolute URI naming another
  authority than ``Host``, a Host that is no RFC 3986 authority, a bad escape...);
- 404 no route for the host and path;
- 503 no endpoint, or none could be connected to (after retries);
- 502 the endpoint broke the protocol or closed without answering;
- 504 no response head within the route's ``timeout`` (``perTryTimeout`` per attempt), or
  ``upstreamTimeout`` when the route sets none.

Retries (Istio's defaults: 2 attempts on connect failures and 503) move to another endpoint;
responses are retried only for requests without a body, since a body is streamed, not kept.
Upstream connections are kept alive and reused (``UpstreamPool``, at most
``POOL_PER_BACKEND`` idle per endpoint).
"""
from __future__ import annotations

import functools
import logging
import random
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from edgemesh.gateway.routes import (
    Forward as RouteForward,
)
from edgemesh.gateway.routes import (
    NotFound,
    PortSpec,
    Route,
    SendDirect,
    SendRedirect,
    Target,
    request_for,
)
from edgemesh.meta.istio import HeaderOps
from edgemesh.meta.models import Service, ServicePort
from edgemesh.meta.store import Backend, Store
from edgemesh.proxy.http import serve_connection
from edgemesh.proxy.http_conn import malformed
from edgemesh.proxy.http_head import Framing, RequestHead, parse_response_head
from edgemesh.proxy.http_pool import TcpDialer, UpstreamPool
from edgemesh.proxy.http_router import (
    Failure,
    Forward,
    HttpLimits,
    Reply,
    request_key,
    text_response,
)
from edgemesh.proxy.http_target import TargetError
from edgemesh.proxy.lb import Balancer
from edgemesh.runtime import metrics
from edgemesh.runtime.logs import Once

log = logging.getLogger(__name__)
_once = Once()

REQUESTS = metrics.counter("edgemesh_gateway_requests_total",
                           "HTTP requests answered by the gateway, by status class.",
                           ["port", "code"])
DURATION = metrics.histogram("edgemesh_gateway_request_duration_seconds",
                             "Time from a request head to the end of its response.", ["port"])
BAD_REQUESTS = metrics.counter("edgemesh_gateway_bad_requests_total",
                               "Requests refused as malformed or over a limit.", ["reason"])
POOL_PER_BACKEND = 32
MAX_KNOWN_TARGETS = 1024
MEMO_PLANS = 32  # request heads remembered with their routing, per client connection
_FAILURE_PAGES = {Failure.NO_ENDPOINT: (503, b"no healthy upstream\n"),
                  Failure.UNREACHABLE: (503, b"no healthy upstream\n"),
                  Failure.BAD_RESPONSE: (502, b"upstream broke the protocol\n"),
                  Failure.NO_ANSWER: (502, b"upstream broke the protocol\n"),
                  Failure.TIMEOUT: (504, b"upstream timed out\n")}


class Upstreams:
    """Endpoints for targets (store + balancers), and the kept-alive connections to them.

    What a target resolves to (balancer, endpoints) is remembered until the store changes."""

    def __init__(self, store: Store, balancers: object, dialer: TcpDialer) -> None:
        self.store = store
        self.balancers = balancers
        self.pool = UpstreamPool(dialer, POOL_PER_BACKEND)
        self._known: dict[int, tuple[Target, Balancer, list[Backend]] | None] = {}
        store.subscribe(self._forget)

    def _forget(self, _kinds: object = None) -> None:
        self._known.clear()

    def endpoints(self, target: Target) -> tuple[Balancer, list[Backend]] | None:
        """The balancer and endpoints of ``target``; None if it names no service port."""
        known = self._known.get(id(target))
        if known is None or known[0] is not target:
            resolved = self.resolve(target)
            if resolved is None:
                return None
            svc, sport = resolved
            if len(self._known) >= MAX_KNOWN_TARGETS:
                self._known.clear()
            known = self._known[id(target)] = (
                target, self.balancers.get(svc, sport),  # type: ignore[attr-defined]
                self.store.backends(svc, sport))
        return known[1], known[2]

    def resolve(self, target: Target) -> tuple[Service, ServicePort] | None:
        svc = self.store.service(target.namespace, target.name)
        if svc is None:
            return None
        if target.port is None:
            port = svc.ports[0] if len(svc.ports) == 1 else None
        else:
            port = next((p for p in svc.ports if p.port == target.port), None)
        return (svc, port) if port is not None else None

    def close(self) -> None:
        self.store.unsubscribe(self._forget)
        self._forget()
        self.pool.close()


def serve(sock: socket.socket, peer: tuple[str, int], spec_of: Callable[[], PortSpec | None],
          server: int, scheme: str, upstreams: Upstreams, limits: HttpLimits,
          fast: bool = True) -> None:
    """Serve HTTP requests on one client connection until it ends (``fast``: a plain socket
    the engine's callback path may drive; TLS connections take the greenlet path)."""
    router = GatewayRouter(spec_of, server, scheme, upstreams, limits)
    serve_connection(sock, peer, router, upstreams.pool, limits, fast=fast)


class _HeaderView(Mapping[str, str]):
    """A request's fields by lower-case name (first value), decoded only when asked for."""
    __slots__ = ("_headers", "_all")

    def __init__(self, head: RequestHead) -> None:
        self._headers = head.headers
        self._all: dict[str, str] | None = None

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        value = _first(self._headers, name.encode("latin-1"))
        return value.decode("latin-1") if value is not None else default

    def _dict(self) -> dict[str, str]:
        if self._all is None:
            self._all = {}
            for n, v in self._headers:
                self._all.setdefault(n.decode("latin-1").lower(), v.decode("latin-1"))
        return self._all

    def __getitem__(self, name: str) -> str:
        return self._dict()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __len__(self) -> int:
        return len(self._dict())


def _first(headers: tuple[tuple[bytes, bytes], ...], name: bytes) -> bytes | None:
    for n, v in headers:
        if len(n) == len(name) and n.lower() == name:
            return v
    return None


@dataclass(slots=True)
class _Plan:
    """What a request head is routed to, up to the per-request parts (endpoints, deadline)."""
    target: Target
    route: Route
    wire: bytes
    response_timeout: float
    edit: Callable[[bytes], bytes] | None
    retry: Callable[[int], bool]


class GatewayRouter:
    """The route table's decision for each request on one client connection.

    A head seen before on this connection, under the same route table, routed without a
    weighted choice, reuses its plan (``MEMO_PLANS``): the route, the rewritten head."""

    def __init__(self, spec_of: Callable[[], PortSpec | None], server: int, scheme: str,
                 upstreams: Upstreams, limits: HttpLimits) -> None:
        self.spec_of = spec_of
        self.server = server
        self.scheme = scheme
        self.upstreams = upstreams
        self.limits = limits
        self.port = 0
        self._counters: dict[int, metrics.Counter] = {}
        self._duration: metrics.Histogram | None = None
        self._plans: dict[bytes, tuple[PortSpec, _Plan | Reply]] = {}

    def decide(self, head: RequestHead, raw: bytes, client_ip: str) -> Forward | Reply:
        spec = self.spec_of()
        if spec is None:
            return Reply(404, text_response(404, b"no gateway server on this port\n", False), False)
        known = self._plans.get(raw)
        if known is not None and known[0] is spec:
            plan = known[1]
        else:
            if spec.port != self.port:
                self.port, self._counters, self._duration = spec.port, {}, None
            plan, fixed = self._plan(spec, head, client_ip)
            if fixed:
                if len(self._plans) >= MEMO_PLANS:
                    self._plans.clear()
                self._plans[raw] = (spec, plan)
        if isinstance(plan, Reply):
            return plan
        found = self.upstreams.endpoints(plan.target)
        if found is None:
            return Reply(503, text_response(503, b"no such service port\n", False), False)
        balancer, backends = found
        route = plan.route
        return Forward(balancer, backends, request_key(balancer.spec, head, client_ip), plan.wire,
                       response_timeout=plan.response_timeout,
                       attempts=1 + max(route.attempts, 0), retry_on=plan.retry,
                       edit_response=plan.edit,
                       deadline=time.monotonic() + route.timeout if route.timeout else 0.0)

    def _plan(self, spec: PortSpec, head: RequestHead, client_ip: str
              ) -> tuple[_Plan | Reply, bool]:
        """The plan for a request, and whether it holds for the same head again."""
        try:
            req = request_for(head.method.decode("latin-1"), head.target, _host_field(head),
                              _HeaderView(head), self.scheme, spec.port)
        except TargetError as e:
            return self._refused(e, client_ip), False
        action = spec.decide(req, random.random(), self.server)
        keep = head.framing is Framing.NONE and head.keep_alive
        if isinstance(action, NotFound):
            return Reply(404, text_response(404, b"no route\n", keep), keep), True
        if isinstance(action, SendRedirect):
            location = ((b"Location", action.location.encode("latin-1")),)
            reply = text_response(action.status, b"", keep, location)
            return Reply(action.status, reply, keep), True
        if isinstance(action, SendDirect):
            return Reply(action.status, text_response(action.status, action.body, keep), keep), True
        route = action.route
        ops = _ops(action, "response")
        plan = _Plan(action.target, route, _request_head(head, action, client_ip,
                                                              self.scheme),
                     route.per_try_timeout or route.timeout or self.limits.response_timeout,
                     functools.partial(_edit_response, ops, head.method) if ops else None,
                     functools.partial(_retriable, route))
        weighted = sum(1 for t in route.targets if t.weight > 0)
        return plan, len(route.targets) == 1 or weighted == 1

    def _refused(self, error: TargetError, client_ip: str) -> Reply:
        """A target or authority routing must not guess at: 400, counted by cause with every
        other malformed message, and the connection closed (what follows it on the
        connection cannot be trusted either)."""
        malformed("client", error, client_ip)
        return Reply(400, text_response(400, f"{error}\n".encode(), False), False)

    def failed(self, failure: Failure, status: int, detail: str, keep: bool) -> Reply | None:
        if failure in (Failure.BAD_REQUEST, Failure.HEAD_TIMEOUT):
            BAD_REQUESTS.labels(str(status)).inc()
            if _once(("bad", detail)):
                log.info("gateway refused a request: %s", detail)
            return Reply(status, text_response(status, f"{detail}\n".encode(), False), False)
        status, body = _FAILURE_PAGES[failure]
        return Reply(status, text_response(status, body, keep), keep)

    def count(self, status: int, started: float) -> None:
        counter = self._counters.get(status)
        if counter is None:
            counter = self._counters[status] = REQUESTS.labels(
                str(self.port), f"{status // 100}xx")
        counter.inc()
        if self._duration is None:
            self._duration = DURATION.labels(str(self.port))
        self._duration.observe(time.monotonic() - started)


def _host_field(head: RequestHead) -> bytes | None:
    """The Host field's value; None when the request has none (HTTP/1.0 may omit it)."""
    return head.host or head.header(b"host")


def _apply_ops(headers: list[tuple[bytes, bytes]], ops: HeaderOps | None) -> None:
    if ops is None:
        return
    drop = {n.lower().encode() for n in ops.remove} | {n.lower().encode() for n, _ in ops.set}
    if drop:
        headers[:] = [(n, v) for n, v in headers if n.lower() not in drop]
    headers.extend((n.encode("latin-1"), v.encode("latin-1")) for n, v in ops.set)
    headers.extend((n.encode("latin-1"), v.encode("latin-1")) for n, v in ops.add)


_DROPPED = (b"host", b"x-forwarded-proto", b"x-forwarded-for")


def _request_head(head: RequestHead, action: RouteForward, client_ip: str, scheme: str
                  ) -> bytes:
    xff = head.header(b"x-forwarded-for")
    headers = [(b"Host", action.authority.encode("latin-1"))]
    headers += [(n, v) for n, v in head.headers if n.lower() not in _DROPPED]
    ip = client_ip.encode()
    headers.append((b"X-Forwarded-For", xff + b", " + ip if xff else ip))
    headers.append((b"X-Forwarded-Proto", scheme.encode()))
    for ops in _ops(action, "request"):
        _apply_ops(headers, ops)
    lines = [head.method + b" " + action.path.encode("latin-1") + b" HTTP/" + head.version,
             *(n + b": " + v for n, v in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _edit_response(ops: list[HeaderOps], method: bytes, raw: bytes) -> bytes:
    """The response head with the route's header operations applied."""
    headers = list(parse_response_head(raw, method).headers)
    for o in ops:
        _apply_ops(headers, o)
    first = raw.split(b"\n", 1)[0].rstrip(b"\r")
    return b"\r\n".join([first, *(n + b": " + v for n, v in headers)]) + b"\r\n\r\n"


def _ops(action: RouteForward, which: str) -> list[HeaderOps]:
    out = []
    for h in (action.route.headers, action.target.headers):
        if h is not None:
            out.append(getattr(h, which))
    return out


def _retriable(route: Route, status: int) -> bool:
    on = route.retry_on
    return ("5xx" in on and status >= 500) or \
        ("gateway-error" in on and status in (502, 503, 504)) or \
        (status == 503 and ("503" in on or "retriable-status-codes" in on))
