"""The real packages of each CPU (``make packages-CPU``), installed as their package managers
would into a fake root, then run from there: the .deb's binary through its systemd unit's
path; the .ipk's agent as its init script starts it from ``/etc/config/edgemesh``."""
from __future__ import annotations

import glob
import os
import re

import pytest

from tests.devices.artifacts import (
    CPUS,
    DIST,
    HELLO_IP,
    prepare,
    require_cpu,
    run_agent,
    smoke,
)
from tests.packages import (
    control_fields,
    install_deb,
    install_ipk,
    load_script,
    mounted,
    procd_commands,
    tmpfs,
    uci_sections,
    with_busybox,
)
from tests.procs import free_port

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
        prepare(root)  # the user's part: /etc/edgemesh/psk, and manifests to serve
        dns, admin = free_port(), free_port()
        cfg = uci_sections(os.path.join(root, "etc/config/edgemesh"))
        cfg["agent"].update(enabled="1", no_iptables="1", node_name="edge-node-1",
                            manifests=["/etc/edgemesh/manifests"],
                            dns_listen=f"127.0.0.1:{dns}", admin=f"127.0.0.1:{admin}",
                            tunnel_listen=f"127.0.0.1:{free_port()}")
        with mounted(root):
            argv = procd_commands(root, cfg)["agent"]  # the init script, run in the root
            assert argv[:2] == ["/usr/bin/edgemesh", "agent"] and "--no-iptables" in argv
            assert argv[argv.index("--psk-file") + 1] == "/etc/edgemesh/psk"
            seen = run_agent(root, argv, dns, admin)  # what procd would start
        mode = os.stat(os.path.join(root, "etc/edgemesh/state")).st_mode & 0o777
    assert seen["dig"] == HELLO_IP and seen["exit"] == 0, seen["log"]
    assert mode == 0o700
