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


CONNTRACK = """\
ipv4     2 udp      17 28 src=10.0.0.5 dst=10.96.0.10 sport=5353 dport=53 src=169.254.96.16 \
dst=10.0.0.5 sport=41001 dport=5353 mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.0.5 dst=10.96.7.1 sport=40222 dport=80 \
src=169.254.96.16 dst=10.0.0.5 sport=41000 dport=40222 [ASSURED] mark=0 zone=0 use=2
ipv6     10 tcp      6 60 SYN_RECV src=fd00:0000:0000:0000:0000:0000:0000:0005 \
dst=fd00:0010:0096:0000:0000:0000:0000:0030 sport=5000 dport=8080 \
src=fd00:0169:0254:0096:0000:0000:0000:0016 dst=fd00:0000:0000:0000:0000:0000:0000:0005 \
sport=41000 dport=5000 mark=0 zone=0 use=2
ipv4     2 tcp      6 10 TIME_WAIT src=10.0.0.5 dst=10.96.7.1 sport=1 \
garbage
"""


def test_original_destination_from_the_conntrack_table() -> None:
    from edgemesh.proxy.transparent import original_from_conntrack
    lines = CONNTRACK.splitlines()
    assert original_from_conntrack(lines, "tcp", "169.254.96.16", 41000, "10.0.0.5",
                                   40222) == ("10.96.7.1", 80)
    assert original_from_conntrack(lines, "tcp", "fd00:169:254:96::16", 41000, "fd00::5",
                                   5000) == ("fd00:10:96::30", 8080)
    # the UDP entry has the same shape but is not TCP; an unknown peer port finds nothing
    assert original_from_conntrack(lines, "tcp", "169.254.96.16", 41001, "10.0.0.5",
                                   5353) is None
    assert original_from_conntrack(lines, "tcp", "169.254.96.16", 41000, "10.0.0.5",
                                   1) is None


def test_the_conntrack_table_agrees_with_so_original_dst_in_a_namespace() -> None:
    """A DNATed connection in a namespace: the /proc reading (the fallback where getsockopt
    is refused, as under qemu-user) gives what SO_ORIGINAL_DST gives."""
    import sys

    import pytest

    from tests import netlab
    if netlab.can_run():
        pytest.skip(netlab.can_run())
    code = """
import socket, gevent
from edgemesh.proxy import transparent as t
srv = socket.socket(); srv.bind(("127.0.0.1", 41000)); srv.listen()
cli = socket.create_connection(("10.96.7.1", 80))
conn, peer = srv.accept()
local = conn.getsockname()
with open(t.PROC_CONNTRACK) as f:
    via_proc = t.original_from_conntrack(f, "tcp", local[0], local[1], peer[0], peer[1])
print(via_proc == t._getsockopt_original_dst(conn, socket.AF_INET), via_proc)
"""
    with netlab.Lab() as lab:
        ns = lab.netns("ct")
        ns.run("ip", "link", "set", "lo", "up")
        ns.sysctl("net.ipv4.conf.all.route_localnet", "1")
        ns.run("ip", "route", "add", "10.96.0.0/16", "dev", "lo")
        ns.run("iptables", "-t", "nat", "-A", "OUTPUT", "-d", "10.96.7.1", "-p", "tcp",
               "--dport", "80", "-j", "DNAT", "--to-destination", "127.0.0.1:41000")
        out = ns.run(sys.executable, "-c", code).stdout.split(None, 1)
        assert out[0] == "True", out
        assert "('10.96.7.1', 80)" in out[1]
