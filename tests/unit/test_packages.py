"""The .deb and the OpenWrt .ipk and .apk (packaging/foreign/mkpkg.py), built from a stand-in
install tree, installed as dpkg, opkg and apk would, the init script's UCI → flags mapping run
from the installed files. tests/devices/ does the same with the real builds; the Yocto recipe
is checked in tests/unit/test_yocto.py."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile

import pytest

from tests.packages import (
    BUSYBOX,
    control_fields,
    dpkg,
    install_apk,
    install_deb,
    install_ipk,
    load_script,
    procd_commands,
    run_apk_script,
    uci_sections,
    with_busybox,
)
from tests.unit.test_manifests import parse_args

mkpkg = load_script("mkpkg")
FAKE_EXE = b"#!/bin/sh\necho edgemesh \"$@\"\n"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> str:
    """What portable.py writes, in miniature: the executable, _internal/, glibc/, the link."""
    top = tmp_path_factory.mktemp("tree")
    lib = top / "usr/lib/edgemesh"
    (lib / "_internal").mkdir(parents=True)
    (lib / "glibc").mkdir()
    (lib / "edgemesh").write_bytes(FAKE_EXE)
    (lib / "edgemesh").chmod(0o755)
    (lib / "_internal/libpython3.11.so.1.0").write_bytes(b"\x7fELF" + b"\0" * 100)
    (lib / "_internal/libpython3.so").symlink_to("libpython3.11.so.1.0")
    (lib / "glibc/libc.so.6").write_bytes(b"\x7fELF libc")
    (top / "usr/bin").mkdir()
    (top / "usr/bin/edgemesh").symlink_to("../lib/edgemesh/edgemesh")
    return str(top)


@pytest.fixture(scope="module")
def deb(tree: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return mkpkg.build_deb(tree, "arm64", str(tmp_path_factory.mktemp("deb")))


@pytest.fixture(scope="module")
def ipk(tree: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return mkpkg.build_ipk(tree, "arm64", str(tmp_path_factory.mktemp("ipk")))


@pytest.fixture(scope="module")
def apk(tree: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return mkpkg.build_apk(tree, "arm64", str(tmp_path_factory.mktemp("apk")))


def test_packages_are_reproducible(tree: str, deb: str, ipk: str, apk: str, tmp_path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert os.path.basename(deb) == "edgemesh_0.1.0-1_arm64.deb"
    assert os.path.basename(ipk) == "edgemesh_0.1.0-r1_aarch64_generic.ipk"
    assert os.path.basename(apk) == "edgemesh-0.1.0-r1_aarch64_generic.apk"
    again = [mkpkg.build_deb(tree, "arm64", str(tmp_path)),
             mkpkg.build_ipk(tree, "arm64", str(tmp_path)),
             mkpkg.build_apk(tree, "arm64", str(tmp_path))]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    with open(mkpkg.build_apk(tree, "arm64", str(tmp_path / "dated")), "rb") as f:
        dated = mkpkg.load_apk().read_package(f.read())
    assert {f.mtime for d in dated.dirs for f in d.files} == {1700000000}
    for first, second in zip([deb, ipk, apk], again, strict=True):
        with open(first, "rb") as a, open(second, "rb") as b:
            assert a.read() == b.read()


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed")
def test_deb_passes_dpkg_deb(deb: str) -> None:
    info = subprocess.run(["dpkg-deb", "--info", deb], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    fields = control_fields(subprocess.run(["dpkg-deb", "--field", deb], capture_output=True,
                                           text=True, check=True).stdout)
    assert fields["Package"] == "edgemesh" and fields["Architecture"] == "arm64"
    assert fields["Depends"] == "iproute2, iptables"
    listing = subprocess.run(["dpkg-deb", "--contents", deb], capture_output=True, text=True,
                             check=True).stdout
    assert "./usr/bin/edgemesh -> ../lib/edgemesh/edgemesh" in listing
    for path in ("./lib/systemd/system/edgemesh-agent.service",
                 "./lib/systemd/system/edgemesh-server.service",
                 "./etc/sysctl.d/60-edgemesh.conf", "./usr/lib/edgemesh/glibc/libc.so.6"):
        assert path in listing
    assert all(" root/root " in line for line in listing.splitlines())


@pytest.mark.skipif(shutil.which("dpkg") is None or os.geteuid() != 0,
                    reason="needs dpkg and root")
def test_deb_installs_runs_and_purges_in_a_fake_root(deb: str, tmp_path) -> None:
    root = str(tmp_path / "root")
    r = install_deb(deb, root)
    assert r.returncode == 0, r.stderr
    assert "Status: install ok installed" in dpkg(root, "-s", "edgemesh").stdout
    assert os.stat(os.path.join(root, "etc/edgemesh")).st_mode & 0o777 == 0o700
    unit = open(os.path.join(root, "lib/systemd/system/edgemesh-agent.service")).read()
    (exec_start,) = re.findall(r"^ExecStart=(\S+)", unit, re.M)
    out = subprocess.run([root + exec_start, "version"], capture_output=True, text=True)
    assert out.stdout == "edgemesh version\n"  # the stand-in, reached through the symlink
    r = dpkg(root, "--purge", "edgemesh")
    assert r.returncode == 0, r.stderr
    assert not os.path.lexists(os.path.join(root, "usr/bin/edgemesh"))


def test_ipk_is_what_ipkg_build_writes(ipk: str) -> None:
    with tarfile.open(ipk, "r:gz") as outer:
        assert outer.getnames() == ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]
        assert all(m.uid == 0 and m.gid == 0 and m.mtime == 0 for m in outer)


@pytest.mark.skipif(not os.path.exists(BUSYBOX) or os.geteuid() != 0,
                    reason="needs busybox-static (the fake root's shell) and root (chroot)")
def test_ipk_installs_as_opkg_would_and_maps_uci_to_flags(ipk: str, tmp_path) -> None:
    root = str(tmp_path / "root")
    meta = install_ipk(ipk, root)
    with_busybox(root)
    fields = control_fields(meta["control"])
    assert fields["Architecture"] == "aarch64_generic" and fields["Version"] == "0.1.0-r1"
    assert "ip-full" in fields["Depends"] and "iptables-nft" in fields["Depends"]
    assert meta["conffiles"] == "/etc/config/edgemesh\n"
    assert os.stat(os.path.join(root, "etc/config/edgemesh")).st_mode & 0o777 == 0o600
    assert os.access(os.path.join(root, "etc/init.d/edgemesh"), os.X_OK)
    listed = open(os.path.join(root, "usr/lib/opkg/info/edgemesh.list")).read().split()
    assert "/usr/bin/edgemesh" in listed and "/etc/config/edgemesh" in listed
    check_uci_mapping(root)


def check_uci_mapping(root: str) -> None:
    """The installed init script, run in ``root``: nothing starts as shipped; the agent's
    command line follows the UCI options; no PSK, no agent."""
    shipped = uci_sections(os.path.join(root, "etc/config/edgemesh"))
    assert procd_commands(root, shipped) == {}  # disabled by default: nothing starts
    psk = os.path.join(root, "etc/edgemesh/psk")
    with open(psk, "w") as f:
        f.write("k" * 32)
    shipped["agent"].update(enabled="1", no_iptables="1", node_name="router-1",
                            manifests=["/etc/edgemesh/manifests"])
    argv = procd_commands(root, shipped)["agent"]
    assert argv[0] == "/usr/bin/edgemesh"
    words, flags = parse_args(argv[1:])
    assert words == ["agent"] and "--no-iptables" in argv
    assert flags["--psk-file"] == "/etc/edgemesh/psk" and flags["--node-name"] == "router-1"
    assert flags["--manifests"] == "/etc/edgemesh/manifests"
    assert os.stat(os.path.join(root, "etc/edgemesh/state")).st_mode & 0o777 == 0o700
    os.unlink(psk)
    assert "agent" not in procd_commands(root, shipped)  # no PSK: logged, not started


def test_ipk_prerm_is_the_makefiles(ipk: str, tmp_path) -> None:
    root = str(tmp_path / "root")
    meta = install_ipk(ipk, root)
    assert "/usr/bin/edgemesh cleanup || true" in meta["prerm"]
    assert "$${" not in meta["prerm"]  # make's escaping undone
    r = subprocess.run(["sh", os.path.join(root, "usr/lib/opkg/info/edgemesh.prerm")],
                       env={**os.environ, "IPKG_INSTROOT": root}, capture_output=True)
    assert r.returncode == 0  # an image build (IPKG_INSTROOT set) stops nothing


def test_apk_carries_the_ipks_files_and_what_openwrts_buildroot_adds(ipk: str, apk: str,
                                                                      tmp_path) -> None:
    pkg = mkpkg.load_apk().read_package(open(apk, "rb").read())
    assert pkg.info | {"description": ""} == {
        "name": "edgemesh", "version": "0.1.0-r1", "arch": "aarch64_generic",
        "license": "Apache-2.0", "origin": "package/net/edgemesh", "description": "",
        "url": "https://github.com/kubeedge/edgemesh", "maintainer": "EdgeMesh maintainers"}
    assert pkg.info["description"].startswith("One agent per node of a KubeEdge cluster")
    assert pkg.depends == ("ip-full", "iptables-nft", "kmod-br-netfilter", "kmod-ipt-nat",
                           "kmod-nft-compat", "kmod-nft-nat")
    assert pkg.provides == ("edgemesh-any",)
    files = {(f"{d.path}/{f.name}", f.mode, f.data, f.link) for d in pkg.dirs for f in d.files}
    with tarfile.open(ipk, "r:gz") as outer:
        data = outer.extractfile("./data.tar.gz")
        assert data is not None
        with tarfile.open(fileobj=data, mode="r:gz") as tar:
            ipk_files = {(m.name[2:], m.mode, tar.extractfile(m).read() if m.isfile() else b"",
                          m.linkname) for m in tar if not m.isdir()}
            ipk_dirs = {(m.name[2:], m.mode) for m in tar if m.isdir() and m.name != "./"}
    meta = {p for p, *_ in files - ipk_files}
    assert meta == {"lib/apk/packages/edgemesh.list", "lib/apk/packages/edgemesh.conffiles",
                    "lib/apk/packages/edgemesh.conffiles_static"}
    assert ipk_dirs <= {(d.path, d.mode) for d in pkg.dirs}
    by_path = {p: data for p, _, data, _ in files}
    listed = by_path["lib/apk/packages/edgemesh.list"].decode().split()
    assert listed == sorted("/" + p for p, *_ in ipk_files)
    config = by_path["etc/config/edgemesh"]
    assert by_path["lib/apk/packages/edgemesh.conffiles_static"].decode() == (
        f"/etc/config/edgemesh {hashlib.sha256(config).hexdigest()}\n")
    assert set(pkg.scripts) == {"post-install", "post-upgrade", "pre-deinstall"}
    assert "default_postinst" in pkg.scripts["post-install"]
    assert pkg.scripts["post-upgrade"].startswith("#!/bin/sh\nexport PKG_UPGRADE=1\n[ ")
    prerm = pkg.scripts["pre-deinstall"]
    assert prerm.count("#!") == 1 and prerm.index("default_prerm") < prerm.index("cleanup")


@pytest.mark.skipif(not os.path.exists(BUSYBOX) or os.geteuid() != 0,
                    reason="needs busybox-static (the fake root's shell) and root (chroot)")
def test_apk_installs_as_apk_would_and_maps_uci_to_flags(apk: str, tmp_path) -> None:
    root = str(tmp_path / "root")
    with_busybox(root)  # apk runs the scripts chrooted: OpenWrt's /bin/sh
    pkg = install_apk(apk, root)
    installed = open(os.path.join(root, "lib/apk/db/installed")).read()
    assert "P:edgemesh\nV:0.1.0-r1\nA:aarch64_generic\n" in installed
    assert "F:etc/edgemesh\nM:0:0:700\n" in installed
    assert "F:etc/config\nR:edgemesh\na:0:0:600\n" in installed
    assert os.readlink(os.path.join(root, "usr/bin/edgemesh")) == "../lib/edgemesh/edgemesh"
    check_uci_mapping(root)
    run_apk_script(root, pkg, "pre-deinstall")  # no /lib/functions.sh here: a no-op, exit 0


# ---- portable.py: what it reads from readelf ---------------------------------------------------

READELF_D = """
Dynamic section at offset 0x2d0 contains 27 entries:
  Tag        Type                         Name/Value
 0x0000000000000001 (NEEDED)             Shared library: [libz.so.1]
 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]
 0x000000000000000f (RPATH)              Library rpath: [$ORIGIN/glibc]
 0x000000000000001d (RUNPATH)            Library runpath: [/root/.pyenv/versions/3.11.7/lib]
"""
READELF_L = """
  INTERP         0x0002a8 0x00000000004002a8 0x00000000004002a8 0x00001c 0x00001c R   0x1
      [Requesting program interpreter: /lib64/ld-linux-x86-64.so.2]
"""


def test_portable_reads_needed_libraries_paths_and_the_interpreter() -> None:
    portable = load_script("portable")
    assert portable.bracketed(READELF_D, "(NEEDED)") == ["libz.so.1", "libc.so.6"]
    assert portable.bracketed(READELF_D, "PATH)") == [
        "$ORIGIN/glibc", "/root/.pyenv/versions/3.11.7/lib"]
    (line,) = portable.bracketed(READELF_L, "program interpreter")
    assert line.split(": ", 1)[1] == "/lib64/ld-linux-x86-64.so.2"
