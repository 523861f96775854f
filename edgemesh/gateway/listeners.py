"""Where the gateway listens: addresses chosen by interface and IP lists, and live listeners.

Address choice (sans-IO, ``select_addresses``) follows the Go EdgeMesh's config keys:
``nic`` (``*`` or comma-separated interface names), ``includeIP`` (``*`` or IPs/CIDRs) and
``excludeIP`` (``*`` meaning *none*, as in the Go EdgeMesh, or IPs/CIDRs). IPv4 and IPv6
addresses both count; IPv6 link-local addresses (``fe80::/10``) are skipped, since listening
there needs a scope and no client reaches a gateway that way.

``ListenerSet.reconcile(wanted)`` opens listeners for new (address, port) pairs and closes
those no longer wanted. Closing a listener only stops accepting: connections it accepted
before live on (they belong to the shared pool), so a route change never drops a client.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gevent.pool import Pool
from gevent.server import StreamServer

from edgemesh.runtime import metrics

log = logging.getLogger(__name__)

LISTEN_ERRORS = metrics.counter("edgemesh_gateway_listen_errors_total",
                                "Gateway listeners that could not be opened.", ["port"])

Handler = Callable[[socket.socket, tuple[str, int], int], None]


@dataclass(frozen=True)
class InterfaceAddress:
    ifname: str
    ip: str


def interface_addresses(by_device: dict[str, set[str]]) -> list[InterfaceAddress]:
    """``netdev.addresses_by_device()`` as (interface, address) pairs, in interface order."""
    return [InterfaceAddress(name, ip) for name, ips in by_device.items()
            for ip in sorted(ips, key=lambda s: (":" in s, s))]


def _networks(spec: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None:
    """``*`` → None (everything); else the listed IPs/CIDRs (bad entries raise ValueError)."""
    spec = spec.strip()
    if spec in ("*", ""):
        return None
    return [ipaddress.ip_network(p.strip(), strict=False) for p in spec.split(",") if p.strip()]


def select_addresses(addresses: Iterable[InterfaceAddress], nic: str, include: str,
                     exclude: str) -> list[str]:
    """The IPs to listen on (see the module docstring), sorted, without duplicates."""
    names = None if nic.strip() in ("*", "") else {n.strip() for n in nic.split(",")}
    wanted = _networks(include)
    unwanted = _networks(exclude) or []
    chosen = set()
    for a in addresses:
        ip = ipaddress.ip_address(a.ip)
        if names is not None and a.ifname not in names:
            continue
        if ip.version == 6 and ip.is_link_local:
            continue
        if wanted is not None and not any(ip in n for n in wanted):
            continue
        if any(ip in n for n in unwanted):
            continue
        chosen.add(a.ip)
    return sorted(chosen, key=lambda s: (":" in s, s))


def check_ip_lists(include: str, exclude: str) -> str:
    """"" when both lists parse, else the problem (reported by the module at start)."""
    for key, value in (("includeIP", include), ("excludeIP", exclude)):
        try:
            _networks(value)
        except ValueError as e:
            return f"modules.edgeGateway.{key}: {e}"
    return ""


def open_listener(ip: str, port: int, backlog: int = 1024) -> socket.socket:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((ip, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class ListenerSet:
    """Listeners by (ip, port), all feeding one bounded pool of connection handlers."""

    def __init__(self, handler: Handler, max_connections: int) -> None:
        self._handler = handler
        self.pool = Pool(max_connections)
        self._servers: dict[tuple[str, int], StreamServer] = {}
        self.errors: dict[tuple[str, int], str] = {}

    @property
    def active(self) -> list[tuple[str, int]]:
        return sorted(self._servers)

    def reconcile(self, wanted: set[tuple[str, int]]) -> None:
        for key in [k for k in self._servers if k not in wanted]:
            self._servers.pop(key).close()  # stops accepting; accepted connections live on
            log.info("gateway stopped listening on %s", _show(key))
        self.errors = {k: v for k, v in self.errors.items() if k in wanted}
        for key in sorted(wanted - set(self._servers)):
            self._open(key)

    def _open(self, key: tuple[str, int]) -> None:
        ip, port = key
        try:
            sock = open_listener(ip, port)
        except OSError as e:
            if key not in self.errors:
                LISTEN_ERRORS.labels(str(port)).inc()
                log.error("gateway cannot listen on %s: %s", _show(key), e.strerror or e)
            self.errors[key] = e.strerror or str(e)
            return
        self.errors.pop(key, None)

        def handle(client: socket.socket, address: tuple[str, int]) -> None:
            self._handler(client, address, port)
        server = StreamServer(sock, handle, spawn=self.pool)
        server.start()
        self._servers[key] = server
        log.info("gateway listening on %s", _show(key))

    def close(self) -> None:
        for server in self._servers.values():
            server.close()
        self._servers.clear()
        self.pool.kill(block=False)


def _show(key: tuple[str, int]) -> str:
    ip, port = key
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
