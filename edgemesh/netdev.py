"""The agent's own network device: the ``edgemesh0`` bridge holding the link-local address.

``ensure(config)`` creates bridge ``commonConfig.bridgeDeviceName`` with
``commonConfig.bridgeDeviceIP``/32 (as the Go EdgeMesh does; this kernel family has no
``dummy`` links), and falls back to putting the address on ``lo`` where bridges are refused.
It is idempotent: the DNS module and the proxy both call it for the same device.
``ensure_ipv6(config)`` adds ``commonConfig.bridgeDeviceIPv6``/128 to the same device (without
duplicate address detection: the bridge has no ports, so DAD would leave it tentative and
unbindable); the proxy calls it only when it has IPv6 service addresses to serve.
``remove(config)`` undoes all of it; ``edgemesh cleanup`` runs it.

Addresses are read with one netlink dump (``edgemesh.netlink``), not by forking ``ip``: the
agent may hold thousands of descriptors, and nothing it does on a timer should fork. Where
netlink is refused and there is no ``ip`` program either, listing addresses logs that once and
finds none (as busybox's ``ip``, which lacks ``-j``, does); changing them raises
``tasks.MissingHelper``.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import socket
import subprocess

from edgemesh import netlink
from edgemesh.config import Config
from edgemesh.runtime import tasks

log = logging.getLogger(__name__)
_missing_ip_logged = False


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return tasks.run(["ip", *args], check=check, timeout=10)


def _cidr(ip: str) -> str:
    return f"{ip}/{ipaddress.ip_address(ip).max_prefixlen}"


def addresses_by_device() -> dict[str, set[str]]:
    """Every interface's addresses: one netlink dump (no helper process); ``ip -j addr``
    only where netlink is refused; none when that fails too or ``ip`` is missing."""
    global _missing_ip_logged
    try:
        return _by_name(netlink.dump_addresses())
    except OSError as e:
        log.debug("netlink address dump failed (%s); asking ip", e)
    try:
        out = _ip("-j", "addr", "show", check=False)
    except tasks.MissingHelper as e:
        if not _missing_ip_logged:
            _missing_ip_logged = True
            log.error("%s; carrying on without this node's address list", e)
        return {}
    if out.returncode != 0:
        return {}
    try:
        links = json.loads(out.stdout or b"[]")
    except ValueError:
        return {}
    return {link.get("ifname", ""): {a.get("local", "") for a in link.get("addr_info", [])
                                     if a.get("local")} for link in links}


def _by_name(found: list[tuple[int, str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {name: set() for _, name in socket.if_nameindex()}
    names: dict[int, str] = {}
    for index, ip in found:
        if index not in names:
            try:
                names[index] = socket.if_indextoname(index)
            except OSError:
                names[index] = f"if{index}"  # gone between the dump and the lookup
        out.setdefault(names[index], set()).add(ip)
    return out


def local_addresses() -> set[str]:
    """Every address assigned to an interface of this node (network namespace)."""
    return {ip for ips in addresses_by_device().values() for ip in ips}


def ensure(config: Config) -> str:
    """Make the agent's address exist; returns the device holding it ("edgemesh0" or "lo")."""
    name = config.commonConfig.bridgeDeviceName
    ip = config.commonConfig.bridgeDeviceIP
    devices = addresses_by_device()
    for device, ips in devices.items():
        if ip in ips:
            return device
    if name not in devices:
        made = _ip("link", "add", name, "type", "bridge", check=False)
        if made.returncode != 0 and b"File exists" not in made.stderr:
            log.warning("cannot create bridge %s (%s); putting %s on lo", name,
                        made.stderr.decode(errors="replace").strip(), ip)
            _add_address(ip, "lo")
            return "lo"
    _ip("link", "set", name, "up", check=False)
    _add_address(ip, name)
    log.info("device %s holds %s", name, ip)
    return name


def ensure_ipv6(config: Config) -> str:
    """Make the agent's IPv6 address exist beside its IPv4 one; returns the device holding it.

    Raises ``subprocess.CalledProcessError`` where the kernel refuses it (IPv6 disabled)."""
    ip = str(ipaddress.IPv6Address(config.commonConfig.bridgeDeviceIPv6))  # as `ip` shows it
    for device, ips in addresses_by_device().items():
        if ip in ips:
            return device
    device = ensure(config)
    _add_address(ip, device, "nodad")
    log.info("device %s holds %s", device, ip)
    return device


def _add_address(ip: str, device: str, *flags: str) -> None:
    added = _ip("addr", "add", _cidr(ip), "dev", device, *flags, check=False)
    if added.returncode != 0 and b"File exists" not in added.stderr:
        raise subprocess.CalledProcessError(added.returncode, ["ip", "addr", "add", ip],
                                            added.stdout, added.stderr)


def remove(config: Config) -> None:
    """Delete the bridge and any fallback address on lo; nothing to remove is fine."""
    name = config.commonConfig.bridgeDeviceName
    ip = config.commonConfig.bridgeDeviceIP
    devices = addresses_by_device()
    if name in devices:
        _ip("link", "del", name, check=False)
        log.info("removed device %s", name)
    ipv6 = config.commonConfig.bridgeDeviceIPv6
    for addr in (ip, str(ipaddress.IPv6Address(ipv6)) if ipv6 else ""):
        if addr and addr in devices.get("lo", set()):
            _ip("addr", "del", _cidr(addr), "dev", "lo", check=False)
            log.info("removed %s from lo", addr)
