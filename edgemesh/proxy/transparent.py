"""The transparent listeners: one socket per protocol and family for every intercepted address.

TCP: the rules DNAT every service (IP, port) — and NodePort — to one listening socket; each
accepted connection's original destination is read back from conntrack with
``getsockopt(SO_ORIGINAL_DST)`` (IPv4: ``SOL_IP``/80; IPv6: ``IP6T_SO_ORIGINAL_DST``,
``SOL_IPV6``/80) and looked up in a ``Steering`` table, whose handler (a ``tcp.TCPPort``, or
an https/http port of ``http_listen``) takes the connection over. A connection whose
destination is in no table (someone connected to the listener's own address, or a rule
outlived its service) is closed at once and counted in
``edgemesh_proxy_unknown_destination_total``.

UDP: see ``udp.TransparentUDP`` (TPROXY and ``IP_RECVORIGDSTADDR``).
"""
from __future__ import annotations

import _socket
import logging
import socket
import struct
from typing import Any

from edgemesh.proxy.steering import Steering
from edgemesh.proxy.tcp import Acceptor, TCPPort, TCPProxy
from edgemesh.runtime import metrics
from edgemesh.runtime.logs import Once

log = logging.getLogger(__name__)
_once = Once()

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST is the same number
UNKNOWN = metrics.counter("edgemesh_proxy_unknown_destination_total",
                          "Intercepted connections or datagrams whose original destination "
                          "is no service port (closed or dropped), by protocol.", ["protocol"])


def original_dst(sock: Any, family: int) -> tuple[str, int]:
    """The destination a DNATed TCP connection was sent to, from conntrack."""
    if family == _socket.AF_INET6:
        raw = sock.getsockopt(_socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack_from("!H", raw, 2)[0]
    raw = sock.getsockopt(_socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return socket.inet_ntoa(raw[4:8]), struct.unpack_from("!H", raw, 2)[0]


class TransparentTCP:
    """The one TCP listener of a family: accepts, finds the service port, hands over."""

    def __init__(self, proxy: TCPProxy, ip: str, port: int = 0) -> None:
        self.steering: Steering[TCPPort] = Steering()
        self.acceptor = Acceptor(proxy, ip, port, self._dispatch, f"transparent-tcp-{ip}")
        self.family = self.acceptor.family
        self.address = self.acceptor.address

    def _dispatch(self, client: Any, addr: tuple[Any, ...]) -> None:
        try:
            ip, port = original_dst(client, self.family)
        except OSError as e:  # ENOENT: not a NATed connection (no conntrack entry)
            ip, port = f"unknown ({e.strerror})", 0
        handler = self.steering.lookup(ip, port) if port else None
        if handler is None:
            UNKNOWN.labels("tcp").inc()
            if _once(("tcp", ip, port)):
                log.warning("connection from %s to %s:%d: no service port there; closed",
                            addr[0], ip, port)
            client.close()
            return
        handler.accept(client, addr)

    def close(self) -> None:
        self.acceptor.close()
