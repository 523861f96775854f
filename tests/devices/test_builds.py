"""Each CPU's builds, as a device runs them: the libc-independent one in an empty root (only
its own files, /proc, /dev and /tmp: no libc, no shell, no ``ip``), the plain onefile in the
Debian root it was built in (under qemu for ARM)."""
from __future__ import annotations

import os
import shutil
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
from tests.packages import mounted

pytestmark = [pytest.mark.devices, pytest.mark.slow]
MACHINE = {"amd64": "X86-64", "arm64": "AArch64", "armv7": "ARM"}


@pytest.mark.parametrize("cpu", CPUS)
def test_portable_build_runs_in_an_empty_root(cpu: str, tmp_path) -> None:
    tree = portable_tree(cpu)
    require_cpu(cpu)
    root = str(tmp_path / "root")
    shutil.copytree(tree, root, symlinks=True)
    exe = os.path.join(root, "usr/lib/edgemesh/edgemesh")
    header = subprocess.run(["readelf", "-h", exe], capture_output=True, text=True).stdout
    assert MACHINE[cpu] in header
    with mounted(root):
        seen = smoke(root, "/usr/bin/edgemesh")
        assert os.listdir(os.path.join(root, "tmp")) == []  # onedir: nothing unpacked
    assert seen["version"] == {**seen["version"], "frozen": True}  # type: ignore[dict-item]
    assert seen["dig"] == HELLO_IP and seen["exit"] == 0, seen["log"]
    log = str(seen["log"])
    # no `ip` in the root: one line says so, the agent serves anyway
    assert "helper program 'ip' not found" in log and "Traceback" not in log
    assert sorted(os.listdir(root)) == ["dev", "etc", "proc", "tmp", "usr"]


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
