"""This node's IPv4 addresses worth registering as LAN addresses (from the one address reader,
``netdev.addresses_by_device``: a netlink dump)."""
from __future__ import annotations

import ipaddress

from edgemesh import netdev

SKIPPED_PREFIXES = ("lo", "docker", "edgemesh", "tunl", "flannel", "cni", "kube-ipvs", "veth",
                    "virbr")


def usable(ifname: str, address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (ifname.startswith(SKIPPED_PREFIXES) or ip.is_loopback or ip.is_link_local)


def local_ipv4() -> list[str]:
    """Global-scope IPv4 addresses of real interfaces, in interface order."""
    found = []
    for ifname, ips in netdev.addresses_by_device().items():
        found += sorted(ip for ip in ips if ":" not in ip and usable(ifname, ip))
    return found
