"""The contract between the HTTP engine (``http``, ``httpflow``) and the routers that decide
what each request gets (``http_listen.HttpPort``, ``gateway.http.GatewayRouter``): the
listener's limits, what a router answers (``Forward`` or ``Reply``), and what can go wrong
(``Failure``). No I/O here.
"""
from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from edgemesh.meta.store import Backend
from edgemesh.proxy.http_head import HeadLimits, RequestHead
from edgemesh.proxy.lb import Balancer, HashKey, LBSpec


@dataclass(frozen=True)
class HttpLimits:
    """Bounds and timeouts (seconds) of one HTTP listener."""
    head: HeadLimits = HeadLimits()
    head_timeout: float = 30.0  # first byte of a request head → its end (slow clients)
    idle_timeout: float = 120.0  # a keep-alive connection waiting for its next request
    body_timeout: float = 60.0  # longest pause inside a body, either direction
    # a request body trickled in: after body_rate_grace s it must have averaged body_min_rate
    # bytes/s (Apache's mod_reqtimeout body=20,MinRate=500 in spirit), else 408
    body_min_rate: float = 500.0
    body_rate_grace: float = 10.0
    response_timeout: float = 60.0  # request sent → response head read, else 504
    connect_timeout: float = 5.0
    connect_attempts: int = 3  # endpoints tried before answering 502
    tunnel_idle_timeout: float = 3600.0  # an upgraded (WebSocket) connection with no traffic
    max_body: int = 0  # request body bytes allowed (0: unlimited), else 413


class Failure(enum.Enum):
    """What went wrong with a request; the router turns it into what the client sees."""
    BAD_REQUEST = "bad_request"  # malformed or oversized (the status is the parser's hint)
    HEAD_TIMEOUT = "head_timeout"  # a request head not complete within head_timeout
    NO_ENDPOINT = "no_endpoint"
    UNREACHABLE = "unreachable"  # no endpoint could be connected to
    BAD_RESPONSE = "bad_response"  # the endpoint broke the protocol
    NO_ANSWER = "no_answer"  # the endpoint closed without answering
    TIMEOUT = "timeout"  # no response head in time


@dataclass(slots=True)
class Reply:
    """A complete response the router answers itself; ``keep``: the connection may go on."""
    status: int
    data: bytes
    keep: bool


@dataclass(slots=True)
class Forward:
    """Send the request to an endpoint of ``backends`` chosen by ``balancer`` for ``key``."""
    balancer: Balancer
    backends: Sequence[Backend]
    key: str | None
    wire: bytes  # the request head as it goes upstream
    response_timeout: float = 0.0  # 0: the listener's ``response_timeout``
    attempts: int = 0  # endpoints tried (0: the listener's ``connect_attempts``)
    retry_on: Callable[[int], bool] | None = None  # statuses worth another endpoint (no body)
    edit_response: Callable[[bytes], bytes] | None = None  # the response head as sent on
    deadline: float = 0.0  # monotonic end of all attempts (0: none)

    def wait(self, default: float) -> float:
        """How long to wait for a response head now (``default``: the listener's timeout)."""
        wait = self.response_timeout or default
        if not self.deadline:
            return wait
        return max(0.001, min(wait, self.deadline - time.monotonic()))


class Router(Protocol):
    """What a listener decides; see the module docstring."""

    def decide(self, head: RequestHead, raw: bytes, client_ip: str) -> Forward | Reply: ...

    def failed(self, failure: Failure, status: int, detail: str, keep: bool) -> Reply | None:
        """The answer to a failure (None: close without one)."""

    def count(self, status: int, started: float) -> None: ...


_REASONS = {200: b"OK", 301: b"Moved Permanently", 302: b"Found", 303: b"See Other",
            307: b"Temporary Redirect", 308: b"Permanent Redirect", 400: b"Bad Request",
            403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
            408: b"Request Timeout", 413: b"Content Too Large",
            431: b"Request Header Fields Too Large", 501: b"Not Implemented",
            502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
            505: b"HTTP Version Not Supported"}


def reason(status: int) -> bytes:
    """The reason phrase our own responses carry (the proxy's and the gateway's alike)."""
    return _REASONS.get(status, b"Error")


def text_response(status: int, body: bytes, keep: bool = False,
                  extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A complete response with a plain text body: the one error page of the proxy and the
    gateway (``Connection: close`` unless ``keep``)."""
    lines = [b"HTTP/1.1 %d %s" % (status, reason(status)),
             b"Content-Length: %d" % len(body), b"Content-Type: text/plain; charset=utf-8",
             *(n + b": " + v for n, v in extra)]
    if not keep:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def cookie_value(head: RequestHead, name: str) -> str | None:
    """The value of cookie ``name`` in the request's Cookie fields (quotes removed)."""
    wanted = name.encode("latin-1")
    for n, v in head.headers:
        if n.lower() != b"cookie":
            continue
        for pair in v.split(b";"):
            k, eq, val = pair.strip().partition(b"=")
            if eq and k == wanted:
                return val.strip(b'"').decode("latin-1")
    return None


def query_value(target: bytes, name: str) -> str | None:
    """The raw value of query parameter ``name`` in a request target."""
    _, q, query = target.partition(b"?")
    if not q:
        return None
    wanted = name.encode("latin-1")
    for pair in query.split(b"#", 1)[0].split(b"&"):
        k, _, val = pair.partition(b"=")
        if k == wanted:
            return val.decode("latin-1")
    return None


def request_key(spec: LBSpec, head: RequestHead, client_ip: str) -> str | None:
    """The balancing key of a request under ``spec`` (None: no key, plain policy): the one
    rule of the proxy and the gateway. A header: its first value. A cookie: its value in any
    ``Cookie`` field, quotes removed (Envoy's ``parseCookieValue``). A query parameter: its raw
    value."""
    kind = spec.hash_key
    if kind is HashKey.HTTP_HEADER:
        value = head.header(spec.hash_name.lower().encode("latin-1"))
        return value.decode("latin-1") if value is not None else None
    if kind is HashKey.HTTP_COOKIE:
        return cookie_value(head, spec.hash_name)
    if kind is HashKey.HTTP_QUERY:
        return query_value(head.target, spec.hash_name)
    return client_ip if spec.wants_client_ip else None
