"""The transparent listeners: one socket per protocol and family for every intercepted address.

TCP: the rules DNAT every service (IP, port) — and NodePort — to one listening socket; each
accepted connection's original destination is read back from conntrack with
``getsockopt(SO_ORIGINAL_DST)`` (IPv4: ``SOL_IP``/80; IPv6: ``IP6T_SO_ORIGINAL_DST``,
``SOL_IPV6``/80) and looked up in a ``Steering`` table, whose handler (a ``tcp.TCPPort``, or
an https/http port of ``http_listen``) takes the connection over. A connection whose
destination is in no table (someone connected to the listener's own address, or a rule
outlived its service) is closed at once and counted in
``edgemesh_proxy_unknown_destination_total``. Where the kernel interface refuses that
``getsockopt`` (ENOPROTOOPT: seen under qemu-user, which does not translate it, when an
aarch64 build is tried on an x86-64 host), the destination is read from the same conntrack
entry in ``/proc/net/nf_conntrack`` instead (logged once: it costs a read of the table).

UDP: the rules send every service (IP, port) of UDP to one socket with TPROXY (no address
rewritten); ``TransparentUDP`` reads each datagram's original destination from its
``IP_RECVORIGDSTADDR`` (``IPV6_RECVORIGDSTADDR``) ancillary data and hands it to the port
registered there, a ``udp.TransparentUDPPort``, whose new session binds a socket of its own
to that address (``IP_TRANSPARENT``) and connects it to the client: replies leave from the
service address, and the client's next datagrams reach that socket directly.
"""
from __future__ import annotations

import _socket
import errno
import ipaddress
import logging
import socket
import struct
from typing import Any

from edgemesh.proxy.steering import Steering
from edgemesh.proxy.tcp import Acceptor, TCPPort, TCPProxy
from edgemesh.proxy.udp import RECV_SIZE, TransparentUDPPort, transparent_socket
from edgemesh.runtime import metrics, tasks
from edgemesh.runtime.logs import Once

log = logging.getLogger(__name__)
_once = Once()

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST is the same number
UNKNOWN = metrics.counter("edgemesh_proxy_unknown_destination_total",
                          "Intercepted connections or datagrams whose original destination "
                          "is no service port (closed or dropped), by protocol.", ["protocol"])


def original_dst(sock: Any, family: int) -> tuple[str, int]:
    """The destination a DNATed TCP connection was sent to, from conntrack."""
    try:
        return _getsockopt_original_dst(sock, family)
    except OSError as e:
        if e.errno != errno.ENOPROTOOPT:
            raise
    if _once("proc-conntrack"):
        log.warning("getsockopt(SO_ORIGINAL_DST) is not available here (%s); reading "
                    "original destinations from %s", errno.errorcode[errno.ENOPROTOOPT],
                    PROC_CONNTRACK)
    local, peer = sock.getsockname(), sock.getpeername()
    try:
        with open(PROC_CONNTRACK, encoding="ascii", errors="replace") as f:
            found = original_from_conntrack(f, "tcp", local[0], local[1], peer[0], peer[1])
    except OSError as e:
        raise OSError(errno.ENOENT, f"no {PROC_CONNTRACK}: {e.strerror}") from None
    if found is None:
        raise OSError(errno.ENOENT, "no conntrack entry")
    return found


PROC_CONNTRACK = "/proc/net/nf_conntrack"


def original_from_conntrack(lines: Any, proto: str, local_ip: str, local_port: int,
                            peer_ip: str, peer_port: int) -> tuple[str, int] | None:
    """The original destination of the conntrack entry whose reply tuple runs from
    ``local`` to ``peer`` (what a DNATed connection's accepted socket sees), from the text
    of ``/proc/net/nf_conntrack``; None when there is no such entry."""
    local_ip, peer_ip = _canonical(local_ip), _canonical(peer_ip)
    reply = (local_ip, peer_ip, str(local_port), str(peer_port))
    for line in lines:
        words = line.split()
        if len(words) < 4 or words[2] != proto:
            continue
        fields = [w.split("=", 1) for w in words if "=" in w]
        src = [v for k, v in fields if k == "src"]
        dst = [v for k, v in fields if k == "dst"]
        sport = [v for k, v in fields if k == "sport"]
        dport = [v for k, v in fields if k == "dport"]
        if len(src) < 2 or len(dst) < 2 or len(sport) < 2 or len(dport) < 2:
            continue
        if (_canonical(src[1]), _canonical(dst[1]), sport[1], dport[1]) == reply:
            return _canonical(dst[0]), int(dport[0])
    return None


def _canonical(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip.split("%", 1)[0]))
    except ValueError:
        return ip


def _getsockopt_original_dst(sock: Any, family: int) -> tuple[str, int]:
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


IP_RECVORIGDSTADDR, IPV6_RECVORIGDSTADDR = 20, 74  # linux/in.h, linux/in6.h
CMSG_SPACE = 64


def cmsg_original_dst(ancillary: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The original destination in a TPROXY'd datagram's ancillary data."""
    for level, kind, data in ancillary:
        if level == _socket.SOL_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            return socket.inet_ntoa(data[4:8]), struct.unpack_from("!H", data, 2)[0]
        if level == _socket.IPPROTO_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            return (socket.inet_ntop(socket.AF_INET6, data[8:24]),
                    struct.unpack_from("!H", data, 2)[0])
    return None


class TransparentUDP:
    """The one UDP socket of a family that TPROXY delivers the first datagrams of every
    session to; each goes to the port registered for its original destination, whose session
    then answers from (and receives on) a socket of its own (``udp.TransparentUDPPort``)."""

    def __init__(self, ip: str, port: int = 0) -> None:
        self.steering: Steering[TransparentUDPPort] = Steering()
        sock = transparent_socket((ip, port))
        v6 = sock.family == _socket.AF_INET6
        sock.setsockopt(_socket.IPPROTO_IPV6 if v6 else _socket.SOL_IP,
                        IPV6_RECVORIGDSTADDR if v6 else IP_RECVORIGDSTADDR, 1)
        self.sock = socket.socket(fileno=sock.detach())  # cooperative
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self._server = tasks.spawn(f"proxy-udp-transparent-{ip}", self._serve)

    def _serve(self) -> None:
        while True:
            try:
                data, ancillary, _, client = self.sock.recvmsg(RECV_SIZE, CMSG_SPACE)
            except OSError as e:
                if self.sock.fileno() < 0:
                    return
                log.debug("transparent udp recv: %s", e)
                continue
            local = cmsg_original_dst(ancillary)
            handler = self.steering.lookup(*local) if local is not None else None
            if handler is None or local is None:
                UNKNOWN.labels("udp").inc()
                if _once(("udp", local)):
                    log.warning("datagram from %s to %s: no service port there; dropped",
                                client[0], local)
                continue
            handler.datagram(data, client[:2], local)

    def close(self) -> None:
        self._server.kill(block=False)
        self.sock.close()
