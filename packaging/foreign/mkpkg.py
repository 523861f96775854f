"""Build the .deb and the OpenWrt .ipk from an install tree, with the standard library only.

    python3 packaging/foreign/mkpkg.py deb|ipk TREE CPU OUTDIR [PACKAGE_ARCH]

TREE is what ``portable.py`` writes (``usr/lib/edgemesh/`` + ``usr/bin/edgemesh``); CPU is
``amd64``, ``arm64`` or ``armv7``; PACKAGE_ARCH overrides the architecture
written in the package (OpenWrt names its architectures by core: ``aarch64_cortex-a53``, ...).
The configuration files come from ``packaging/``: the systemd units and sysctl file for the
.deb; the OpenWrt directory's init script, UCI file and sysctl file for the .ipk, laid out as
its ``Package/edgemesh/install`` does and described from its Makefile's fields.

Formats, written byte for byte reproducibly (mtime ``SOURCE_DATE_EPOCH`` or 0, root:root):
- .deb: an ``ar`` archive of ``debian-binary`` ("2.0\\n"), ``control.tar.gz``, ``data.tar.gz``.
- .ipk: what OpenWrt's ``ipkg-build`` writes for opkg: a gzip'd tar of ``./debian-binary``,
  ``./data.tar.gz``, ``./control.tar.gz``. OpenWrt 25.12 and later install ``.apk`` (APK v3)
  packages only; building those needs apk-tools 3 (``apk mkpkg``, as the OpenWrt SDK does
  with ``packaging/openwrt/edgemesh/``), which this script does not replace.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGING = os.path.dirname(HERE)
OPENWRT = os.path.join(PACKAGING, "openwrt", "edgemesh")
DEB_ARCH = {"amd64": "amd64", "arm64": "arm64", "armv7": "armhf"}
# the opkg architecture each CPU's package is labelled with unless told otherwise: the
# generic aarch64 one, and the most common armv7 router core (IPQ40xx, Raspberry Pi 2/3)
IPK_ARCH = {"amd64": "x86_64", "arm64": "aarch64_generic", "armv7": "arm_cortex-a7_neon-vfpv4"}
DESCRIPTION = ("EdgeMesh agent: cluster DNS, service proxy and tunnel for edge Kubernetes")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One member of a package's data: a directory, a file (``data``) or a symlink."""

    path: str  # relative, no leading "./"
    mode: int
    data: bytes | None = None
    link: str = ""

    @property
    def kind(self) -> bytes:
        if self.link:
            return tarfile.SYMTYPE
        return tarfile.DIRTYPE if self.data is None else tarfile.REGTYPE


def mtime() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


def targz(entries: list[Entry]) -> bytes:
    """A reproducible gzip'd tar of ``entries`` named ``./path``, owned by root."""
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=mtime(), compresslevel=9) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for e in entries:
                info = tarfile.TarInfo("./" + e.path if e.path else "./")
                info.type, info.mode, info.linkname = e.kind, e.mode, e.link
                info.size = len(e.data) if e.data is not None and not e.link else 0
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = mtime()
                tar.addfile(info, io.BytesIO(e.data) if info.size else None)
    return raw.getvalue()


def ar(members: list[tuple[str, bytes]]) -> bytes:
    """A System V ``ar`` archive, as dpkg reads it."""
    out = [b"!<arch>\n"]
    for name, data in members:
        header = (f"{name:<16}{mtime():<12}{0:<6}{0:<6}{0o100644:<8o}{len(data):<10}`\n")
        out += [header.encode(), data, b"\n" if len(data) % 2 else b""]
    return b"".join(out)


def tree_entries(tree: str, top: str = "usr") -> list[Entry]:
    """Every directory, file and symlink under ``tree/top``, sorted, modes kept."""
    entries = [Entry(top, 0o755)]
    for dirpath, dirnames, filenames in os.walk(os.path.join(tree, top)):
        dirnames.sort()
        rel = os.path.relpath(dirpath, tree)
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                entries.append(Entry(f"{rel}/{name}", 0o777, link=os.readlink(path)))
            else:
                entries.append(Entry(f"{rel}/{name}", 0o755))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                entries.append(Entry(f"{rel}/{name}", 0o777, link=os.readlink(path)))
            else:
                with open(path, "rb") as f:
                    entries.append(Entry(f"{rel}/{name}", os.stat(path).st_mode & 0o777,
                                         f.read()))
    return entries


def with_parents(entries: list[Entry]) -> list[Entry]:
    """``entries`` plus a directory entry for every parent not listed, parents first."""
    listed = {e.path for e in entries}
    out: list[Entry] = []
    for e in entries:
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in listed:
                listed.add(parent)
                out.append(Entry(parent, 0o755))
        out.append(e)
    return out


def read(*parts: str) -> bytes:
    with open(os.path.join(*parts), "rb") as f:
        return f.read()


def makefile_fields(text: str) -> dict[str, str]:
    """``NAME:=value`` lines of the OpenWrt Makefile (PKG_*, TITLE, DEPENDS), and the prerm."""
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition(":=")
        if sep and name.replace("_", "").isalnum():
            fields[name] = value.strip()
    start = text.index("define Package/edgemesh/prerm\n") + len("define Package/edgemesh/prerm\n")
    fields["prerm"] = text[start:text.index("endef", start)].replace("$${", "${")
    return fields


def installed_size(entries: list[Entry]) -> int:
    return sum(len(e.data) for e in entries if e.data is not None)


# ---- .deb -----------------------------------------------------------------------------------

DEB_POSTINST = """#!/bin/sh
# units are shipped disabled: enable with `systemctl enable --now edgemesh-agent`
set -e
mkdir -p -m 0700 "$DPKG_ROOT/etc/edgemesh"
if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
exit 0
"""
DEB_PRERM = """#!/bin/sh
set -e
if [ "$1" = remove ] && [ -z "$DPKG_ROOT" ]; then
  if [ -d /run/systemd/system ]; then
    systemctl stop edgemesh-agent.service edgemesh-server.service || true
  fi
  /usr/bin/edgemesh cleanup || true
fi
exit 0
"""
DEB_POSTRM = """#!/bin/sh
set -e
[ "$1" = purge ] && rm -rf "$DPKG_ROOT/var/lib/edgemesh" "$DPKG_ROOT/var/lib/private/edgemesh"
if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
exit 0
"""


def deb_data(tree: str) -> list[Entry]:
    files = [
        Entry("lib/systemd/system/edgemesh-agent.service", 0o644,
              read(PACKAGING, "systemd", "edgemesh-agent.service")),
        Entry("lib/systemd/system/edgemesh-server.service", 0o644,
              read(PACKAGING, "systemd", "edgemesh-server.service")),
        Entry("etc/sysctl.d/60-edgemesh.conf", 0o644,
              read(PACKAGING, "sysctl.d", "60-edgemesh.conf")),
    ]
    return with_parents(tree_entries(tree) + files)


def build_deb(tree: str, cpu: str, outdir: str, arch: str = "") -> str:
    fields = makefile_fields(read(OPENWRT, "Makefile").decode())
    version = f"{fields['PKG_VERSION']}-{fields['PKG_RELEASE']}"
    arch = arch or DEB_ARCH[cpu]
    data = deb_data(tree)
    control = (
        f"Package: edgemesh\nVersion: {version}\nArchitecture: {arch}\n"
        f"Maintainer: {fields['PKG_MAINTAINER']} <edgemesh@kubeedge.io>\n"
        f"Installed-Size: {(installed_size(data) + 1023) // 1024}\n"
        "Depends: iproute2, iptables\nRecommends: conntrack\nSection: net\n"
        "Priority: optional\nHomepage: https://github.com/kubeedge/edgemesh\n"
        f"Description: {DESCRIPTION}\n"
        " One agent per node answers cluster DNS names and proxies service traffic to\n"
        " endpoints on this node or, through an encrypted tunnel, on other nodes behind\n"
        " NATs. Frozen with its own C library: needs no particular glibc version.\n")
    md5sums = "".join(f"{hashlib.md5(e.data).hexdigest()}  {e.path}\n"  # noqa: S324 (dpkg's)
                      for e in data if e.data is not None and not e.link)
    ctl = [Entry("", 0o755)] + [Entry(name, mode, text.encode()) for name, mode, text in (
        ("control", 0o644, control), ("md5sums", 0o644, md5sums),
        ("conffiles", 0o644, "/etc/sysctl.d/60-edgemesh.conf\n"),
        ("postinst", 0o755, DEB_POSTINST), ("prerm", 0o755, DEB_PRERM),
        ("postrm", 0o755, DEB_POSTRM))]
    path = os.path.join(outdir, f"edgemesh_{version}_{arch}.deb")
    blob = ar([("debian-binary", b"2.0\n"), ("control.tar.gz", targz(ctl)),
               ("data.tar.gz", targz(data))])
    _write(path, blob)
    return path


# ---- .ipk -----------------------------------------------------------------------------------

IPK_POSTINST = """#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_postinst $0 $@
"""


def ipk_data(tree: str) -> list[Entry]:
    """``Package/edgemesh/install`` of the OpenWrt Makefile, for an install tree."""
    files = OPENWRT + "/files"
    return with_parents(tree_entries(tree) + [
        Entry("etc/init.d/edgemesh", 0o755, read(files, "edgemesh.init")),
        Entry("etc/config/edgemesh", 0o600, read(files, "edgemesh.config")),
        Entry("etc/sysctl.d/60-edgemesh.conf", 0o644, read(files, "60-edgemesh.conf")),
        Entry("etc/edgemesh", 0o700),
    ])


def build_ipk(tree: str, cpu: str, outdir: str, arch: str = "") -> str:
    fields = makefile_fields(read(OPENWRT, "Makefile").decode())
    version = f"{fields['PKG_VERSION']}-r{fields['PKG_RELEASE']}"
    arch = arch or IPK_ARCH[cpu]
    data = ipk_data(tree)
    depends = ", ".join(d.lstrip("+") for d in fields["DEPENDS"].split())
    control = (f"Package: {fields['PKG_NAME']}\nVersion: {version}\nDepends: {depends}\n"
               f"License: {fields['PKG_LICENSE']}\nSection: net\n"
               f"Maintainer: {fields['PKG_MAINTAINER']}\nArchitecture: {arch}\n"
               f"Installed-Size: {installed_size(data)}\nDescription: {fields['TITLE']}\n")
    ctl = [Entry("", 0o755)] + [Entry(name, mode, text.encode()) for name, mode, text in (
        ("control", 0o644, control), ("conffiles", 0o644, "/etc/config/edgemesh\n"),
        ("postinst", 0o755, IPK_POSTINST), ("prerm", 0o755, fields["prerm"]))]
    outer = [Entry("debian-binary", 0o644, b"2.0\n"),
             Entry("data.tar.gz", 0o644, targz(data)),
             Entry("control.tar.gz", 0o644, targz(ctl))]
    path = os.path.join(outdir, f"{fields['PKG_NAME']}_{version}_{arch}.ipk")
    _write(path, targz(outer))
    return path


def _write(path: str, blob: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(blob)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6):
        raise SystemExit(__doc__)
    kind, tree, cpu, outdir = sys.argv[1:5]
    builder = {"deb": build_deb, "ipk": build_ipk}[kind]
    print(builder(tree, cpu, outdir, *(sys.argv[5:6])))
