"""Addresses over rtnetlink: the parser (bytes in, pairs out) and a dump equal to ``ip addr``."""
from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys

import pytest

from edgemesh import netdev, netlink


def message(mtype: int, body: bytes, seq: int = 1) -> bytes:
    data = struct.pack("=LHHLL", 16 + len(body), mtype, 0, seq, 0) + body
    return data + b"\0" * (-len(data) % 4)


def address(family: int, index: int, attrs: list[tuple[int, bytes]]) -> bytes:
    body = struct.pack("=BBBBL", family, 24, 0, 0, index)
    for kind, value in attrs:
        rta = struct.pack("=HH", 4 + len(value), kind) + value
        body += rta + b"\0" * (-len(rta) % 4)
    return message(netlink.RTM_NEWADDR, body)


def test_parses_local_then_address_and_stops_at_done():
    v4 = address(socket.AF_INET, 2, [(netlink.IFA_ADDRESS, bytes([10, 0, 0, 9])),
                                      (netlink.IFA_LOCAL, bytes([10, 0, 0, 1]))])
    v6 = address(socket.AF_INET6, 3, [(netlink.IFA_ADDRESS, socket.inet_pton(
        socket.AF_INET6, "fd00::1"))])
    other_seq = message(netlink.RTM_NEWADDR, b"\0" * 8, seq=9)
    found, done = netlink.parse_addresses(v4 + other_seq + v6, seq=1)
    assert found == [(2, "10.0.0.1"), (3, "fd00::1")] and not done
    assert netlink.parse_addresses(message(netlink.NLMSG_DONE, b"\0" * 4), 1) == ([], True)


def test_error_answers_raise_and_truncated_input_is_ignored():
    with pytest.raises(OSError):
        netlink.parse_addresses(message(netlink.NLMSG_ERROR, struct.pack("=i", -1) + b"\0" * 16))
    whole = address(socket.AF_INET, 2, [(netlink.IFA_LOCAL, bytes([10, 0, 0, 1]))])
    for cut in range(len(whole)):
        netlink.parse_addresses(whole[:cut])  # never raises, never reads past the end


def test_dump_matches_ip_addr():
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, check=True)
    expected = {link["ifname"]: {a["local"] for a in link.get("addr_info", [])}
                for link in json.loads(out.stdout)}
    assert netdev.addresses_by_device() == expected


def _ip_routes(ns: str, family: str) -> list[dict[str, str]]:
    out = subprocess.run(["ip", "-n", ns, "-j", family, "route", "show", "table", "main"],
                         capture_output=True, check=True).stdout
    return [{"dst": r["dst"], **({"type": r["type"]} if "type" in r else {})}
            for r in json.loads(out)]


@pytest.mark.netns
def test_route_dump_matches_ip_route_in_a_namespace() -> None:
    """Unicast, default, unreachable and blackhole routes of the main table, both families;
    another table's routes are not in it."""
    from tests import netlab
    if netlab.can_run():
        pytest.skip(netlab.can_run())
    with netlab.Lab() as lab:
        ns = lab.netns("routes")
        ns.run("ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        ns.run("ip", "link", "set", "d1", "up")
        ns.run("ip", "link", "set", "d0", "up")
        ns.run("ip", "addr", "add", "10.9.0.2/24", "dev", "d0")
        ns.run("ip", "addr", "add", "fd09::2/64", "dev", "d0", "nodad")
        ns.run("ip", "route", "add", "default", "via", "10.9.0.1")
        ns.run("ip", "route", "add", "10.244.7.0/24", "via", "10.9.0.7")
        ns.run("ip", "route", "add", "unreachable", "10.250.0.0/16")
        ns.run("ip", "route", "add", "blackhole", "10.251.0.0/16")
        ns.run("ip", "route", "add", "10.252.0.0/16", "via", "10.9.0.8", "table", "100")
        code = ("import json, socket; from edgemesh import netlink; "
                "print(json.dumps([netlink.dump_routes(), "
                "netlink.dump_routes(socket.AF_INET6)]))")
        v4, v6 = json.loads(ns.run(sys.executable, "-c", code).stdout)
        assert v4 == _ip_routes(ns.name, "-4") and v6 == _ip_routes(ns.name, "-6")
        assert {"dst": "10.250.0.0/16", "type": "unreachable"} in v4
        assert not any(r["dst"] == "10.252.0.0/16" for r in v4)
