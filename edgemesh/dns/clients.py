"""Who may ask: this node's own addresses, loopback, and ``allowedClients`` (sans-IO).

A node-local DNS server must not become an open resolver or a reflector. UDP queries from
anyone else are dropped without an answer (a REFUSED answer would still be reflected to a
spoofed source); TCP clients, whose address a handshake proved, get REFUSED.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable

LOOPBACK = ("127.0.0.0/8", "::1/128")
MEMO_LIMIT = 4096


class ClientPolicy:
    """``allowed(ip)``: the client is on this node, or in a configured network."""

    def __init__(self, networks: Iterable[str] = (), local: Iterable[str] = ()) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in (*LOOPBACK, *networks)]
        self.local: frozenset[str] = frozenset()
        self.memo: dict[str, bool] = {}
        self.raw_memo: dict[object, bool] = {}  # the UDP loop's: raw sender address → allowed
        self.set_local(local)

    def set_local(self, addresses: Iterable[str]) -> None:
        """Replace the node's own addresses (re-read periodically: interfaces come and go)."""
        local = frozenset(_canonical(a) for a in addresses)
        if local != self.local:
            self.local = local
            self.memo.clear()  # in place: the UDP loop holds a reference
            self.raw_memo.clear()

    def allowed(self, ip: str) -> bool:
        ok = self.memo.get(ip)
        if ok is None:
            ok = self._decide(ip)
            if len(self.memo) >= MEMO_LIMIT:
                self.memo.clear()
            self.memo[ip] = ok
        return ok

    def allowed_raw(self, key: object, ip: str) -> bool:
        """``allowed(ip)``, remembered under ``key`` (the sender's address as read raw)."""
        ok = self.allowed(ip)
        if len(self.raw_memo) >= MEMO_LIMIT:
            self.raw_memo.clear()
        self.raw_memo[key] = ok
        return ok

    def _decide(self, ip: str) -> bool:
        text = ip.split("%", 1)[0]
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return str(addr) in self.local or any(addr in n for n in self.networks
                                              if n.version == addr.version)


def _canonical(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip.split("%", 1)[0]))
    except ValueError:
        return ip
