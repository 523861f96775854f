"""This node's IPv4 addresses worth registering as LAN addresses (``ip -j -4 addr``)."""
from __future__ import annotations

import ipaddress
import json
import logging
import subprocess

from edgemesh.runtime import tasks

log = logging.getLogger(__name__)

SKIPPED_PREFIXES = ("lo", "docker", "edgemesh", "tunl", "flannel", "cni", "kube-ipvs", "veth",
                    "virbr")


def usable(ifname: str, address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (ifname.startswith(SKIPPED_PREFIXES) or ip.is_loopback or ip.is_link_local)


def local_ipv4() -> list[str]:
    """Global-scope IPv4 addresses of real interfaces, in interface order."""
    try:
        out = tasks.run(["ip", "-j", "-4", "addr", "show"], timeout=5,
                        need="the tunnel's list of this node's LAN addresses").stdout
        links = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        log.warning("cannot list local addresses: %s", e)
        return []
    found = []
    for link in links:
        for info in link.get("addr_info", []):
            address = info.get("local")
            if address and usable(link.get("ifname", ""), address):
                found.append(address)
    return found
