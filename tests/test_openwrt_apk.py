"""The x86_64 OpenWrt .apk from a real build, in the default run: the onedir build (``make
onedir``, shared with tests/test_binary.py), made libc-independent (portable.py), packed by
mkpkg.py, installed into a fake OpenWrt root as ``apk add`` would (busybox as its shell), and
the agent started there the way the installed init script says, answering ``dig``.
tests/devices/test_packages.py does the same for every CPU with ``make release``'s packages."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.devices.artifacts import HELLO_IP, agent_from_init_script
from tests.packages import BUSYBOX, install_apk, load_script, with_busybox
from tests.procs import ROOT
from tests.test_binary import ONEDIR, built

pytestmark = pytest.mark.binary
mkpkg = load_script("mkpkg")
portable = load_script("portable")


@pytest.fixture(scope="module")
def apk(tmp_path_factory: pytest.TempPathFactory) -> str:
    missing = [p for p in ("patchelf", "readelf", "dig") if shutil.which(p) is None]
    if missing or not os.path.exists(BUSYBOX) or os.geteuid() != 0:
        pytest.skip(f"needs root, busybox-static and {missing or 'patchelf'} "
                    "(`make device-deps`)")
    exe = built("onedir", ONEDIR, os.path.join(ROOT, "build-pyinstaller", "onedir", "edgemesh"))
    work = tmp_path_factory.mktemp("apk")
    portable.make_portable(os.path.dirname(exe), "/", str(work / "tree"))
    return mkpkg.build_apk(str(work / "tree"), "amd64", str(work))


def test_x86_64_apk_installs_and_its_init_script_starts_a_working_agent(apk: str,
                                                                        tmp_path) -> None:
    root = str(tmp_path / "root")
    with_busybox(root)
    pkg = install_apk(apk, root)
    assert pkg.info["arch"] == "x86_64" and os.path.basename(apk).endswith("_x86_64.apk")
    assert os.path.isfile(os.path.join(root, "usr/lib/edgemesh/glibc/libc.so.6"))
    seen = agent_from_init_script(root)
    assert seen["dig"] == HELLO_IP and seen["exit"] == 0, seen["log"]
