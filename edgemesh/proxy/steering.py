"""Which handler an intercepted connection or datagram belongs to: a lookup from the original
destination (IP, port) to a handler, shared by every service port (and, later, Pod IPs).

Interception sends every service address of a protocol and family to one transparent socket;
the socket learns each flow's original destination (``SO_ORIGINAL_DST`` for TCP after a DNAT,
``IP_RECVORIGDSTADDR`` for UDP under TPROXY) and asks this table whom it is for. The table is
sans-IO: the proxy module fills it from the store, the listeners only read it.

Three kinds of entries, looked up in this order:

- exact ``(ip, port)``: a ClusterIP, externalIP or load-balancer IP and its service port;
- ranges ``(network, first_port, last_port)``: a set of addresses and a port range, e.g. the
  remote Pod IPs of the Edge CNI with ports 1-65535 (``register_range``);
- node ports: ``port`` at any local address of this node (the rules decide which addresses).

The order mirrors the rules: service addresses before NodePorts, so a service IP that happens
to be local is matched by its own port.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

H = TypeVar("H")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class Steering(Generic[H]):
    """Original destination → handler, for one protocol and family."""
    exact: dict[tuple[str, int], H] = field(default_factory=dict)
    node_ports: dict[int, H] = field(default_factory=dict)
    ranges: list[tuple[Network, int, int, H]] = field(default_factory=list)

    def register(self, ips: Iterable[str], port: int, handler: H) -> None:
        """Traffic to any of ``ips`` on ``port`` goes to ``handler``."""
        for ip in ips:
            self.exact[(_canonical(ip), port)] = handler

    def register_node_port(self, port: int, handler: H) -> None:
        """Traffic to ``port`` on a local address of this node goes to ``handler``."""
        self.node_ports[port] = handler

    def register_range(self, network: str, ports: tuple[int, int], handler: H) -> None:
        """Traffic to any address of ``network`` on a port within ``ports`` (inclusive) goes
        to ``handler`` (the Edge CNI's remote Pod networks)."""
        self.ranges.append((ipaddress.ip_network(network, strict=False), *ports, handler))

    def unregister(self, ips: Iterable[str], port: int, handler: H) -> None:
        """Forget ``register(ips, port, handler)``: entries since given to another handler
        (two services claiming one address) stay."""
        for ip in ips:
            key = (_canonical(ip), port)
            if self.exact.get(key) is handler:
                del self.exact[key]

    def unregister_node_port(self, port: int, handler: H) -> None:
        if self.node_ports.get(port) is handler:
            del self.node_ports[port]

    def unregister_range(self, network: str, handler: H) -> None:
        net = ipaddress.ip_network(network, strict=False)
        self.ranges = [r for r in self.ranges if r[0] != net or r[3] is not handler]

    def lookup(self, ip: str, port: int) -> H | None:
        """The handler of a flow whose original destination was ``ip:port``."""
        handler = self.exact.get((ip, port))
        if handler is not None:
            return handler
        if self.ranges:
            addr = ipaddress.ip_address(ip)
            for net, first, last, h in self.ranges:
                if first <= port <= last and addr in net:
                    return h
        return self.node_ports.get(port)

    def __len__(self) -> int:
        return len(self.exact) + len(self.node_ports) + len(self.ranges)


def _canonical(ip: str) -> str:
    return str(ipaddress.ip_address(ip)) if ":" in ip else ip
