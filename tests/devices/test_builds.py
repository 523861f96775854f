"""Each CPU's builds, as a device runs them: the libc-independent one in an empty root (only
its own files, /proc, /dev and /tmp: no libc, no shell, no ``ip``), the plain onefile in the
Debian root it was built in (under qemu for ARM)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from tests.devices.artifacts import (
    CPUS,
    DIST,
    HELLO_IP,
    portable_tree,
    require,
    require_cpu,
    rootfs,
    smoke,
)
from tests.netlab import wait_for
from tests.packages import mounted, tmpfs
from tests.procs import ROOT, free_port

pytestmark = [pytest.mark.devices, pytest.mark.slow]
MACHINE = {"amd64": "X86-64", "arm64": "AArch64", "armv7": "ARM"}


@pytest.mark.parametrize("cpu", CPUS)
def test_portable_build_runs_in_an_empty_root(cpu: str, tmp_path) -> None:
    tree = portable_tree(cpu)
    require_cpu(cpu)
    with tmpfs(str(tmp_path / "root")) as root:
        shutil.copytree(tree, root, symlinks=True, dirs_exist_ok=True)
        exe = os.path.join(root, "usr/lib/edgemesh/edgemesh")
        header = subprocess.run(["readelf", "-h", exe], capture_output=True, text=True).stdout
        assert MACHINE[cpu] in header
        with mounted(root):
            seen = smoke(root, "/usr/bin/edgemesh")
            assert os.listdir(os.path.join(root, "tmp")) == []  # onedir: nothing unpacked
        top = sorted(os.listdir(root))
    assert seen["version"] == {**seen["version"], "frozen": True}  # type: ignore[dict-item]
    assert seen["dig"] == HELLO_IP and seen["exit"] == 0, seen["log"]
    log = str(seen["log"])
    # no `ip` in the root: the agent lists addresses by netlink and serves (a missing helper
    # would be one line naming it: tests/unit/test_helpers.py), never a traceback
    assert "Traceback" not in log
    assert top == ["dev", "etc", "proc", "tmp", "usr"]


@pytest.mark.parametrize("cpu", ["arm64", "armv7"])
def test_onefile_runs_in_its_debian_root(cpu: str) -> None:
    binary = require(os.path.join(DIST, f"edgemesh-linux-{cpu}"), f"binary-{cpu}")
    root = rootfs(cpu)
    require_cpu(cpu)
    with mounted(root):
        shutil.copy(binary, os.path.join(root, "tmp/edgemesh"))
        seen = smoke(root, "/tmp/edgemesh", work="/tmp/smoke")
    assert seen["dig"] == HELLO_IP and seen["exit"] == 0, seen["log"]
    assert "Traceback" not in str(seen["log"])


def test_frozen_agent_gives_its_helpers_the_host_environment(tmp_path) -> None:
    """The bootloader sets LD_LIBRARY_PATH to the bundle; `ip` must not see it (a musl `ip`
    would load the bundle's glibc libraries and fail)."""
    onedir = require(os.path.join(DIST, "edgemesh-onedir", "edgemesh"), "onedir")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    dump = tmp_path / "ip-env"
    (bin_dir / "ip").write_text(f"#!/bin/sh\nenv > {dump}\necho '[]'\n")
    (bin_dir / "ip").chmod(0o755)
    for tool in ("sh", "env"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    psk = tmp_path / "psk"
    psk.write_text("p" * 48)
    admin = free_port()
    # Addresses and routes are read over netlink now: the helper the agent still runs is
    # `ip link add` for its DNS address's device. A device and address of its own (which the
    # fake `ip` only pretends to create) keep this machine's edgemesh0 out of it; the agent
    # may stop once DNS cannot bind there: the test needs only `ip`'s environment.
    config = tmp_path / "agent.yaml"
    config.write_text("commonConfig: {bridgeDeviceName: emtest0, bridgeDeviceIP: 169.254.96.99}\n")
    agent = subprocess.Popen(
        [onedir, "agent", "--config", str(config),
         "--manifests", os.path.join(ROOT, "examples", "hello"),
         "--no-iptables", "--state-dir", str(tmp_path / "state"), "--psk-file", str(psk),
         "--admin", f"127.0.0.1:{admin}",
         "--tunnel-listen", f"127.0.0.1:{free_port()}", "--node-name", "edge-node-1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={"PATH": str(bin_dir), "LD_LIBRARY_PATH": "/opt/host-lib"})
    try:
        wait_for(dump.exists, timeout=60, what="the agent running `ip`")
        wait_for(lambda: "PATH=" in dump.read_text(), timeout=10, what="ip's environment")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert env.get("LD_LIBRARY_PATH") == "/opt/host-lib"  # the user's, restored
    assert not any(k.startswith("_PYI_") or k == "LD_LIBRARY_PATH_ORIG" for k in env)
