"""The transparent UDP socket's reading of a datagram's original destination."""
from __future__ import annotations

import socket
import struct

from edgemesh.proxy.transparent import IP_RECVORIGDSTADDR, IPV6_RECVORIGDSTADDR, cmsg_original_dst


def test_original_destination_from_ancillary_data() -> None:
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 53) + socket.inet_aton(
        "10.96.0.10") + bytes(8)
    v6 = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 7, 0) + socket.inet_pton(
        socket.AF_INET6, "fd00:10:96::30") + bytes(4)
    assert cmsg_original_dst([(socket.SOL_IP, IP_RECVORIGDSTADDR, v4)]) == ("10.96.0.10", 53)
    assert cmsg_original_dst([(socket.SOL_IP, 8, b"\0" * 12),  # IP_PKTINFO: not it
                              (socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, v6)]) == \
        ("fd00:10:96::30", 7)
    assert cmsg_original_dst([]) is None
    assert cmsg_original_dst([(socket.SOL_IP, IP_RECVORIGDSTADDR, v4[:6])]) is None  # short
