"""One balancing key for the proxy and the gateway (review §3.8.1): the same request gives the
same key whichever of the two balances it. Before, for ``Cookie: sid="abc"`` the proxy hashed
``abc`` and the gateway ``"abc"``, and with two Cookie lines the gateway found none."""
from __future__ import annotations

from typing import Any

import pytest

from edgemesh.gateway.http import GatewayRouter
from edgemesh.gateway.routes import Target
from edgemesh.proxy.http_head import parse_request_head
from edgemesh.proxy.http_router import Forward, HttpLimits, request_key
from edgemesh.proxy.lb import Balancer, HashKey, LBSpec, Policy

from .test_gateway_routes import GATEWAY, LABELS, OTHER, build_table

REQ = b"GET /a?x=1&sid=q%20s HTTP/1.1\r\nHost: other.example.com\r\n"

CASES = [
    (HashKey.HTTP_COOKIE, "sid", b'Cookie: sid="abc"\r\n', "abc"),
    (HashKey.HTTP_COOKIE, "sid", b"Cookie: theme=dark\r\nCookie: sid=\"abc\"\r\n", "abc"),
    (HashKey.HTTP_COOKIE, "sid", b"Cookie: theme=dark; sid=abc; x=y\r\n", "abc"),
    (HashKey.HTTP_COOKIE, "sid", b"Cookie: sidx=1\r\n", None),
    (HashKey.HTTP_HEADER, "X-User", b"x-user: alice\r\nX-User: bob\r\n", "alice"),
    (HashKey.HTTP_QUERY, "sid", b"", "q%20s"),
    (HashKey.SOURCE_IP, "", b"", "10.0.0.9"),
]


class _Upstreams:
    def __init__(self, spec: LBSpec) -> None:
        self.spec = spec

    def endpoints(self, target: Target) -> tuple[Any, list[Any]]:
        return Balancer(self.spec), []


@pytest.mark.parametrize(("kind", "name", "fields", "want"), CASES)
def test_proxy_and_gateway_agree(kind: HashKey, name: str, fields: bytes, want: str | None) -> None:
    spec = LBSpec(Policy.CONSISTENT_HASH, kind, name)
    raw = REQ + fields + b"\r\n"
    head = parse_request_head(raw)
    assert request_key(spec, head, "10.0.0.9") == want  # what the proxy's HttpPort computes
    table = build_table([GATEWAY], [OTHER], LABELS)
    router = GatewayRouter(lambda: table.ports[8080], 0, "http", _Upstreams(spec),  # type: ignore[arg-type]
                           HttpLimits())
    decision = router.decide(head, raw, "10.0.0.9")
    assert isinstance(decision, Forward) and decision.key == want


def test_plain_policy_has_no_key_unless_affinity() -> None:
    head = parse_request_head(REQ + b"\r\n")
    assert request_key(LBSpec(), head, "10.0.0.9") is None
    assert request_key(LBSpec(affinity_timeout=10), head, "10.0.0.9") == "10.0.0.9"
