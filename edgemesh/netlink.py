"""Interface addresses and routes over rtnetlink: dumps, and a socket that says when
addresses change.

``dump_addresses()`` asks the kernel for every address (``RTM_GETADDR`` with ``NLM_F_DUMP``)
and returns ``(interface index, address)`` pairs — what ``ip -j addr`` prints, without a helper
process; ``dump_routes()`` does the same for the main routing table (``RTM_GETROUTE``: what
``ip -j route show table main`` prints, as the same dicts). ``AddressEvents`` joins the
IPv4/IPv6 address multicast groups: its descriptor becomes readable when an address is added
or removed, so a consumer re-reads only then, never on a timer. ``parse_addresses`` and
``parse_routes`` are the sans-IO parts (bytes in, values out).
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from typing import TypeVar

RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTA_DST, RTA_TABLE = 1, 15
RT_TABLE_MAIN = 254
# rtm_type values, named as ``ip -j route`` names them (unicast routes carry no "type" there)
ROUTE_TYPES = {2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole",
               7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x10, 0x100
_HDR = struct.Struct("=LHHLL")  # nlmsghdr: len, type, flags, seq, pid
_IFA = struct.Struct("=BBBBL")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTA = struct.Struct("=HH")  # rtattr: len, type
_RTM = struct.Struct("=BBBBBBBBL")  # rtmsg: family, dst_len, src_len, tos, table, protocol,
#                                     scope, type, flags


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse_addresses(data: bytes, seq: int | None = None) -> tuple[list[tuple[int, str]], bool]:
    """``(index, address)`` of every RTM_NEWADDR in ``data``, and whether the dump is done.

    Raises OSError for an NLMSG_ERROR answer; messages of other sequence numbers are skipped.
    """
    out: list[tuple[int, str]] = []
    done = False
    for mtype, body in _messages(data, seq):
        if mtype == NLMSG_DONE:
            done = True
            break
        if mtype != RTM_NEWADDR or len(body) < _IFA.size:
            continue
        family, _plen, _f, _scope, index = _IFA.unpack_from(body)
        attrs = _attributes(body[_IFA.size:])
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        if raw is not None and family in (socket.AF_INET, socket.AF_INET6):
            out.append((index, str(ipaddress.ip_address(raw))))
    return out, done


def parse_routes(data: bytes, seq: int | None = None) -> tuple[list[dict[str, str]], bool]:
    """The main table's routes in ``data`` as ``ip -j route`` shows them (``dst``: a network
    or ``default``; ``type`` unless unicast), and whether the dump is done."""
    out: list[dict[str, str]] = []
    done = False
    for mtype, body in _messages(data, seq):
        if mtype == NLMSG_DONE:
            done = True
            break
        if mtype != RTM_NEWROUTE or len(body) < _RTM.size:
            continue
        family, dst_len, _src, _tos, table, _proto, _scope, rtype, _flags = _RTM.unpack_from(body)
        attrs = _attributes(body[_RTM.size:])
        if RTA_TABLE in attrs and len(attrs[RTA_TABLE]) >= 4:
            table = struct.unpack_from("=L", attrs[RTA_TABLE])[0]
        if table != RT_TABLE_MAIN or family not in (socket.AF_INET, socket.AF_INET6):
            continue
        raw = attrs.get(RTA_DST)
        if raw is None or not dst_len:
            route = {"dst": "default"}
        else:
            route = {"dst": f"{ipaddress.ip_address(raw)}/{dst_len}"}
        if rtype in ROUTE_TYPES:
            route["type"] = ROUTE_TYPES[rtype]
        out.append(route)
    return out, done


def _messages(data: bytes, seq: int | None) -> list[tuple[int, bytes]]:
    """``(type, body)`` of each whole netlink message of sequence ``seq`` in ``data``, up to
    and including NLMSG_DONE; OSError for an NLMSG_ERROR answer."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos + _HDR.size <= len(data):
        length, mtype, _flags, mseq, _pid = _HDR.unpack_from(data, pos)
        if length < _HDR.size or pos + length > len(data):
            break  # truncated: the rest is not a whole message
        body = data[pos + _HDR.size:pos + length]
        pos += _align(length)
        if seq is not None and mseq != seq:
            continue
        if mtype == NLMSG_ERROR:
            code = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
            if code:
                raise OSError(code, os.strerror(code))
            continue
        out.append((mtype, body))
        if mtype == NLMSG_DONE:
            break
    return out


def _attributes(data: bytes) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    pos = 0
    while pos + _RTA.size <= len(data):
        length, kind = _RTA.unpack_from(data, pos)
        if length < _RTA.size or pos + length > len(data):
            break
        attrs.setdefault(kind, data[pos + _RTA.size:pos + length])
        pos += _align(length)
    return attrs


T = TypeVar("T")


def _dump(mtype: int, body: bytes, parse: Callable[[bytes, int], tuple[list[T], bool]]
          ) -> list[T]:
    """Send one ``NLM_F_DUMP`` request and parse the answers until NLMSG_DONE."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.bind((0, 0))
        seq = 1
        s.sendto(_HDR.pack(_HDR.size + len(body), mtype, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
                 + body, (0, 0))
        found: list[T] = []
        while True:
            items, done = parse(s.recv(1 << 16), seq)
            found += items
            if done:
                return found


def dump_addresses() -> list[tuple[int, str]]:
    """Every address of this network namespace, from one netlink dump."""
    return _dump(RTM_GETADDR, _IFA.pack(socket.AF_UNSPEC, 0, 0, 0, 0), parse_addresses)


def dump_routes(family: int = socket.AF_INET) -> list[dict[str, str]]:
    """The main routing table of this network namespace (one family), from one dump."""
    return _dump(RTM_GETROUTE, _RTM.pack(family, 0, 0, 0, 0, 0, 0, 0, 0), parse_routes)


class AddressEvents:
    """A netlink socket in the address groups: readable when an address comes or goes."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))

    def wait(self) -> None:
        """Block (cooperatively under gevent) until something changed; drain the rest."""
        self.sock.recv(1 << 16)
        self.sock.setblocking(False)
        try:
            while self.sock.recv(1 << 16):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()
