"""Packages as their package managers install them, into a fake root: ``dpkg --root`` for the
.deb; for the OpenWrt .ipk (no opkg outside OpenWrt) what ``opkg install -o ROOT`` does, step
by step; for the OpenWrt .apk (no apk-tools 3 in Debian or PyPI) what ``apk add --root ROOT
--allow-untrusted`` does, step by step, the package parsed by ``packaging/foreign/apk.py``'s
reader. Then the installed init script's UCI → flags mapping, with stand-ins for OpenWrt's
``config_*``/``procd_*`` functions. The builders are ``packaging/foreign/mkpkg.py``."""
from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import importlib.util
import io
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from types import ModuleType

from tests.procs import ROOT
from tests.unit.test_manifests import PROCD_STUBS, procd_output

FOREIGN = os.path.join(ROOT, "packaging", "foreign")
IPK_MEMBERS = ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]


def load_script(name: str) -> ModuleType:
    """A script of packaging/foreign/ as a module (``packaging`` is not a Python package)."""
    spec = importlib.util.spec_from_file_location(f"edgemesh_{name}",
                                                  os.path.join(FOREIGN, f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def install_deb(deb: str, root: str) -> subprocess.CompletedProcess[str]:
    """``dpkg --root ROOT -i``: a fresh dpkg database, maintainer scripts run with DPKG_ROOT
    (chrootless: the root holds no shell); dependencies and a foreign CPU forced."""
    for d in ("info", "updates", "triggers"):
        os.makedirs(os.path.join(root, "var/lib/dpkg", d), exist_ok=True)
    status = os.path.join(root, "var/lib/dpkg/status")
    open(status, "a").close()
    return dpkg(root, "--force-depends", "--force-architecture", "-i", deb)


def dpkg(root: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dpkg", f"--root={root}", "--force-script-chrootless",
                           "--log=/dev/null", *args], capture_output=True, text=True,
                          timeout=120)


def install_ipk(ipk: str, root: str) -> dict[str, str]:
    """What ``opkg install -o ROOT`` does, dependency resolution aside: unpack the outer
    tar.gz (the three members, in ipkg-build's order), data into ROOT, control files into
    ``usr/lib/opkg/info/edgemesh.*`` with the file list, a ``status`` entry, then ``postinst``
    with IPKG_INSTROOT. Returns the control files."""
    with tarfile.open(ipk, "r:gz") as outer:
        assert outer.getnames() == IPK_MEMBERS, outer.getnames()
        blobs = {}
        for name in IPK_MEMBERS:
            member = outer.extractfile(name)
            assert member is not None
            blobs[name[2:]] = member.read()
    assert blobs["debian-binary"] == b"2.0\n"
    info = os.path.join(root, "usr/lib/opkg/info")
    os.makedirs(info, exist_ok=True)
    meta: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(blobs["control.tar.gz"])) as ctl:
        for m in ctl:
            if m.isfile():
                f = ctl.extractfile(m)
                assert f is not None
                meta[m.name[2:]] = f.read().decode()
    for name, text in meta.items():
        path = os.path.join(info, f"edgemesh.{name}")
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755 if name in ("postinst", "prerm") else 0o644)
    with tarfile.open(fileobj=io.BytesIO(blobs["data.tar.gz"])) as data:
        listed = [m.name[1:] for m in data if not m.isdir()]
        data.extractall(root, filter="tar")
    with open(os.path.join(info, "edgemesh.list"), "w") as f:
        f.write("\n".join(listed) + "\n")
    fields = meta["control"].split("Description")[0]
    with open(os.path.join(root, "usr/lib/opkg/status"), "a") as f:
        f.write(fields + "Status: install user installed\n\n")
    r = subprocess.run(["sh", os.path.join(info, "edgemesh.postinst")], capture_output=True,
                       env={**os.environ, "IPKG_INSTROOT": root}, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return meta


def install_apk(path: str, root: str) -> ModuleType:
    """What ``apk add --root ROOT --initdb --allow-untrusted ./PKG.apk`` does (apk-tools 3.0.6,
    dependency resolution aside): directories and files with the package's modes, symlinks;
    the package in ``lib/apk/db/installed`` (its v2 text form, as apk writes it: files'
    ``Z:`` is SHA-256 truncated to 160 bits, flagged ``f:S``), its scripts in
    ``lib/apk/db/scripts.tar.gz``, ``NAME><Q1ID`` in ``etc/apk/world``; then ``post-install
    VERSION`` run inside the root (chroot; it needs the root's ``/bin/sh``) from
    ``lib/apk/exec/``, with APK_SCRIPT/APK_PACKAGE set. Returns the parsed package."""
    apk = load_script("apk")
    with open(path, "rb") as f:
        blob = f.read()
    pkg = apk.read_package(blob)
    for d in pkg.dirs:
        target = os.path.join(root, d.path)
        os.makedirs(target, exist_ok=True)
        os.chmod(target, d.mode)
        for f in d.files:
            dest = os.path.join(target, f.name)
            if f.link:
                os.symlink(f.link, dest)
                continue
            with open(dest, "wb") as out:
                out.write(f.data)
            os.chmod(dest, f.mode)
            os.utime(dest, (f.mtime, f.mtime))
    db = os.path.join(root, "lib/apk/db")
    os.makedirs(db, exist_ok=True)
    with open(os.path.join(db, "installed"), "a") as out:
        out.write(apk_installed_entry(pkg, len(blob)))
    name, version = pkg.info["name"], pkg.info["version"]
    scripts = io.BytesIO()
    with tarfile.open(fileobj=scripts, mode="w") as tar:
        for action, text in pkg.scripts.items():
            info = tarfile.TarInfo(f"{name}-{version}.X1{pkg.uid.hex()}.{action}")
            info.size, info.mode = len(text.encode()), 0o755
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(text.encode()))
    with open(os.path.join(db, "scripts.tar.gz"), "wb") as out:
        out.write(gzip.compress(scripts.getvalue(), mtime=0))
    open(os.path.join(db, "triggers"), "a").close()
    os.makedirs(os.path.join(root, "etc/apk"), exist_ok=True)
    with open(os.path.join(root, "etc/apk/world"), "a") as out:
        out.write(f"{name}><{_q1(pkg.uid)}\n")
    run_apk_script(root, pkg, "post-install", version)
    return pkg


def run_apk_script(root: str, pkg, action: str, *args: str) -> None:
    """``action``'s script as apk runs it: from ``lib/apk/exec/`` in the root, chrooted."""
    if action not in pkg.scripts:
        return
    rel = f"lib/apk/exec/{pkg.info['name']}-{pkg.info['version']}.{action}"
    os.makedirs(os.path.join(root, "lib/apk/exec"), mode=0o700, exist_ok=True)
    with open(os.path.join(root, rel), "w") as f:
        f.write(pkg.scripts[action])
    os.chmod(os.path.join(root, rel), 0o755)
    r = subprocess.run(["chroot", root, "/" + rel, *args], capture_output=True, text=True,
                       timeout=30, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                        "APK_SCRIPT": action, "APK_PACKAGE": pkg.info["name"]})
    os.unlink(os.path.join(root, rel))
    os.rmdir(os.path.join(root, "lib/apk/exec"))  # apk runs them from a memfd where it can
    assert r.returncode == 0, f"{action}: {r.stderr}"


def _q1(digest: bytes) -> str:
    return "Q1" + base64.b64encode(digest[:20]).decode()


def apk_installed_entry(pkg, size: int) -> str:
    """The package's entry in ``lib/apk/db/installed``, field for field as apk-tools 3.0.6
    wrote it for this package in the check described in packaging/README.md."""
    info = pkg.info
    lines = [f"C:{_q1(pkg.uid)}", f"P:{info['name']}", f"V:{info['version']}",
             f"A:{info['arch']}", f"S:{size}", f"I:{pkg.installed_size}",
             f"T:{info.get('description', '')}", f"U:{info.get('url', '')}",
             f"L:{info.get('license', '')}", f"o:{info['origin']}", f"m:{info['maintainer']}",
             "D:" + " ".join(pkg.depends)]
    if pkg.provides:
        lines.append("p:" + " ".join(pkg.provides))
    lines.append("f:S")
    for d in pkg.dirs:
        if d.path:
            lines.append(f"F:{d.path}")
            if d.mode != 0o755:
                lines.append(f"M:0:0:{d.mode:o}")
        for f in d.files:
            lines.append(f"R:{f.name}")
            if f.mode != 0o644:
                lines.append(f"a:0:0:{f.mode:o}")
            digest = hashlib.sha256(f.link.encode() if f.link else f.data).digest()
            lines.append(f"Z:{_q1(digest)}")
    return "\n".join(lines) + "\n\n"


def control_fields(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith(" ") and ":" in line:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def uci_sections(path: str) -> dict[str, dict[str, str | list[str]]]:
    """A UCI file: {section: {option: value, list: [values]}} (what ``config_load`` reads)."""
    out: dict[str, dict[str, str | list[str]]] = {}
    current: dict[str, str | list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if words[0] == "config":
                current = out.setdefault(words[2], {})
            elif words[0] == "option":
                current[words[1]] = words[2]
            elif words[0] == "list":
                items = current.setdefault(words[1], [])
                assert isinstance(items, list)
                items.append(words[2])
    return out


BUSYBOX = "/bin/busybox"


def _uci_value(value: str | list[str]) -> str:
    return " ".join(value) if isinstance(value, list) else value


def with_busybox(root: str) -> None:
    """A static busybox as the fake root's ``/bin/sh`` (and cat, mkdir, chmod), as on
    OpenWrt, so the init script runs inside the root (``chroot``)."""
    os.makedirs(os.path.join(root, "bin"), exist_ok=True)
    shutil.copy(BUSYBOX, os.path.join(root, "bin/busybox"))
    for applet in ("sh", "cat", "mkdir", "chmod"):
        link = os.path.join(root, "bin", applet)
        if not os.path.lexists(link):
            os.symlink("busybox", link)


def procd_commands(root: str, sections: dict[str, dict[str, str | list[str]]]
                   ) -> dict[str, list[str]]:
    """The instances the installed ``/etc/init.d/edgemesh`` opens for ``sections``
    ({instance: argv}; "log": logger lines), run in ``root`` by its busybox
    (:func:`with_busybox`) when it has one, else by this machine's ``sh`` (then absolute
    paths in ``sections`` are this machine's)."""
    env = "".join(f"CFG_{section}_{option}={shlex.quote(_uci_value(v))}\n"
                  for section, options in sections.items() for option, v in options.items())
    inside = os.path.exists(os.path.join(root, "bin/busybox"))
    init = "/etc/init.d/edgemesh" if inside else os.path.join(root, "etc/init.d/edgemesh")
    script = f"{PROCD_STUBS}\n{env}\n. {shlex.quote(init)}\nstart_service\n"
    argv = ["chroot", root, "/bin/sh", "-c", script] if inside else ["sh", "-c", script]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert r.returncode == 0, r.stderr
    return procd_output(r.stdout)


@contextlib.contextmanager
def tmpfs(path: str) -> Iterator[str]:
    """A tmpfs on ``path`` (created): a fake root there, because a 32-bit guest under qemu-user
    cannot list ext4 directories (the host kernel hands qemu 64-bit hash cookies); a real
    armv7 kernel has no such problem."""
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", path], check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


@contextlib.contextmanager
def mounted(root: str) -> Iterator[str]:
    """``root`` with /proc, /dev (bind) and a tmpfs /tmp mounted, for chroot; unmounted after."""
    done = []
    try:
        for target, args in (("proc", ["-t", "proc", "proc"]), ("dev", ["--bind", "/dev"]),
                             ("tmp", ["-t", "tmpfs", "-o", "size=256m", "tmpfs"])):
            path = os.path.join(root, target)
            os.makedirs(path, exist_ok=True)
            subprocess.run(["mount", *args, path], check=True, capture_output=True)
            done.append(path)
        yield root
    finally:
        for path in reversed(done):
            subprocess.run(["umount", "-l", path], capture_output=True)


def gunzip_names(blob: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        return tar.getnames()
