"""The real packages of each CPU (``make packages-CPU``), installed as their package managers
would into a fake root, then run from there: the .deb's binary through its systemd unit's
path; the .ipk's and the .apk's agent as their init script starts it from
``/etc/config/edgemesh``."""
from __future__ import annotations

import glob
import os
import re

import pytest

from tests.devices.artifacts import (
    CPUS,
    DIST,
    HELLO_IP,
    agent_from_init_script,
    require_cpu,
    smoke,
)
from tests.packages import (
    control_fields,
    install_apk,
    install_deb,
    install_ipk,
    load_script,
    mounted,
    tmpfs,
    with_busybox,
)

pytestmark = [pytest.mark.devices, pytest.mark.slow]
mkpkg = load_script("mkpkg")


def package(pattern: str, cpu: str) -> str:
    found = glob.glob(os.path.join(DIST, pattern))
    if not found:
        pytest.skip(f"dist/{pattern} not built: `make packages-{cpu}` (or `make test-devices`)")
    return found[0]


@pytest.mark.parametrize("cpu", CPUS)
def test_deb_installs_and_its_unit_runs_the_binary(cpu: str, tmp_path) -> None:
    deb = package(f"edgemesh_*_{mkpkg.DEB_ARCH[cpu]}.deb", cpu)
    require_cpu(cpu)
    with tmpfs(str(tmp_path / "root")) as root:
        r = install_deb(deb, root)
        assert r.returncode == 0, r.stderr
        unit = open(os.path.join(root, "lib/systemd/system/edgemesh-agent.service")).read()
        (exe,) = re.findall(r"^ExecStart=(\S+)", unit, re.M)
        with mounted(root):
            seen = smoke(root, exe)
    assert seen["dig"] == HELLO_IP and seen["exit"] == 0, seen["log"]


@pytest.mark.parametrize("cpu", CPUS)
def test_ipk_installs_and_its_init_script_starts_a_working_agent(cpu: str, tmp_path) -> None:
    ipk = package(f"edgemesh_*_{mkpkg.IPK_ARCH[cpu]}.ipk", cpu)
    require_cpu(cpu)
    with tmpfs(str(tmp_path / "root")) as root:
        meta = install_ipk(ipk, root)
        assert control_fields(meta["control"])["Architecture"] == mkpkg.IPK_ARCH[cpu]
        with_busybox(root)
        seen = agent_from_init_script(root)
    assert seen["dig"] == HELLO_IP and seen["exit"] == 0, seen["log"]


@pytest.mark.parametrize("cpu", CPUS)
def test_apk_installs_and_its_init_script_starts_a_working_agent(cpu: str, tmp_path) -> None:
    path = package(f"edgemesh-*_{mkpkg.IPK_ARCH[cpu]}.apk", cpu)
    require_cpu(cpu)
    with tmpfs(str(tmp_path / "root")) as root:
        with_busybox(root)  # apk runs post-install chrooted, with OpenWrt's /bin/sh
        pkg = install_apk(path, root)
        assert pkg.info["arch"] == mkpkg.IPK_ARCH[cpu]
        seen = agent_from_init_script(root)
    assert seen["dig"] == HELLO_IP and seen["exit"] == 0, seen["log"]
