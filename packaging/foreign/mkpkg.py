"""Build the .deb and the OpenWrt .ipk and .apk from an install tree, with the standard
library only.

    python3 packaging/foreign/mkpkg.py deb|ipk|apk TREE CPU OUTDIR [PACKAGE_ARCH]

TREE is what ``portable.py`` writes (``usr/lib/edgemesh/`` + ``usr/bin/edgemesh``); CPU is
``amd64``, ``arm64`` or ``armv7``; PACKAGE_ARCH overrides the architecture
written in the package (OpenWrt names its architectures by core: ``aarch64_cortex-a53``, ...).
The configuration files come from ``packaging/``: the systemd units and sysctl file for the
.deb; the OpenWrt directory's init script, UCI file and sysctl file for the .ipk, laid out as
its ``Package/edgemesh/install`` does and described from its Makefile's fields.

Formats, written byte for byte reproducibly (mtime ``SOURCE_DATE_EPOCH`` or 0, root:root):
- .deb: an ``ar`` archive of ``debian-binary`` ("2.0\\n"), ``control.tar.gz``, ``data.tar.gz``.
- .ipk: what OpenWrt's ``ipkg-build`` writes for opkg: a gzip'd tar of ``./debian-binary``,
  ``./data.tar.gz``, ``./control.tar.gz``.
- .apk (APK v3, OpenWrt 25.12 and later): what the OpenWrt buildroot's ``apk mkpkg`` call
  (``include/package-pack.mk``) writes, by ``apk.py``: the same files plus
  ``lib/apk/packages/edgemesh.{list,conffiles,conffiles_static}``, its post-install,
  post-upgrade and pre-deinstall scripts; unsigned (``apk add --allow-untrusted``).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import io
import os
import sys
import tarfile
from types import ModuleType

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
    """``NAME:=value`` lines of the OpenWrt Makefile (PKG_*, TITLE, DEPENDS), the prerm and
    the description (whitespace collapsed, as make's ``strip`` does for ``apk mkpkg``)."""
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition(":=")
        if sep and name.replace("_", "").isalnum():
            fields[name] = value.strip()
    fields["prerm"] = _define(text, "prerm").replace("$${", "${")
    fields["description"] = " ".join(_define(text, "description").split())
    return fields


def _define(text: str, name: str) -> str:
    head = f"define Package/edgemesh/{name}\n"
    start = text.index(head) + len(head)
    return text[start:text.index("endef", start)]


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


# ---- .apk (APK v3) ---------------------------------------------------------------------------

# The scripts OpenWrt's include/package-pack.mk writes for `apk mkpkg` (CONFIG_USE_APK): its
# post-install and pre-deinstall wrap default_postinst/default_prerm of /lib/functions.sh (which
# enable/stop the init scripts) around the package's own postinst/prerm, shebangs dropped;
# post-upgrade is post-install with PKG_UPGRADE=1. No preinst/postrm here, so no pre-upgrade or
# post-deinstall.
APK_POST_INSTALL = """#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
export root="${IPKG_INSTROOT}"
export pkgname="edgemesh"
add_group_and_user
default_postinst
"""
APK_PRE_DEINSTALL = """#!/bin/sh
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
export root="${IPKG_INSTROOT}"
export pkgname="edgemesh"
default_prerm
"""
APK_ORIGIN = "package/net/edgemesh"  # where packaging/openwrt/edgemesh/ goes in a buildroot


def _no_shebang(script: str) -> str:
    return "".join(line for line in script.splitlines(keepends=True)
                   if not line.lstrip().startswith("#!"))


def apk_scripts(fields: dict[str, str]) -> dict[str, str]:
    return {"post-install": APK_POST_INSTALL,
            "post-upgrade": "#!/bin/sh\nexport PKG_UPGRADE=1\n" + _no_shebang(APK_POST_INSTALL),
            "pre-deinstall": APK_PRE_DEINSTALL + _no_shebang(fields["prerm"])}


def apk_files(tree: str, name: str, conffiles: list[str]) -> list[Entry]:
    """The .ipk's files plus the ones package-pack.mk adds under ``lib/apk/packages/``: the
    file list (files and symlinks, sorted), the conffiles and their SHA-256 sums."""
    data = ipk_data(tree)
    listed = sorted("/" + e.path for e in data if e.data is not None or e.link)
    by_path = {"/" + e.path: e for e in data}
    static = "".join(f"{c} {hashlib.sha256(by_path[c].data or b'').hexdigest()}\n"
                     for c in conffiles if c in by_path)
    meta = "lib/apk/packages/" + name
    return with_parents(data + [
        Entry(meta + ".list", 0o644, "".join(p + "\n" for p in listed).encode()),
        Entry(meta + ".conffiles", 0o644, "".join(c + "\n" for c in conffiles).encode()),
        Entry(meta + ".conffiles_static", 0o644, static.encode()),
    ])


def apk_dirs(entries: list[Entry], apk: ModuleType) -> list:
    """``entries`` as apk's directories (the root included, as ``apk mkpkg`` writes it)."""
    dirs = {"": (0o755, [])}
    for e in entries:
        if e.data is None and not e.link:
            dirs.setdefault(e.path, (e.mode, []))
    for e in entries:
        if e.data is not None or e.link:
            parent, _, name = e.path.rpartition("/")
            dirs[parent][1].append(apk.File(name, e.mode, e.data or b"", e.link, mtime()))
    return [apk.Dir(path, mode, tuple(files)) for path, (mode, files) in dirs.items()]


def load_apk() -> ModuleType:
    """``apk.py`` beside this script (``packaging`` is no Python package)."""
    spec = importlib.util.spec_from_file_location("edgemesh_apk", os.path.join(HERE, "apk.py"))
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name) or importlib.util.module_from_spec(spec)
    if spec.name not in sys.modules:
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


def build_apk(tree: str, cpu: str, outdir: str, arch: str = "") -> str:
    """OpenWrt's ``edgemesh-VERSION.apk``, named ``edgemesh-VERSION_ARCH.apk`` here so the
    three CPUs' packages can share ``dist/``."""
    apk = load_apk()
    fields = makefile_fields(read(OPENWRT, "Makefile").decode())
    name, version = fields["PKG_NAME"], f"{fields['PKG_VERSION']}-r{fields['PKG_RELEASE']}"
    arch = arch or IPK_ARCH[cpu]
    entries = apk_files(tree, name, ["/etc/config/edgemesh"])
    info = {"name": name, "version": version, "description": fields["description"],
            "arch": arch, "license": fields["PKG_LICENSE"], "origin": APK_ORIGIN,
            "url": fields["URL"], "maintainer": fields["PKG_MAINTAINER"]}
    depends = tuple(d.lstrip("+") for d in fields["DEPENDS"].split())
    # every OpenWrt package provides the virtual NAME-any (include/package.mk)
    pkg = apk.Package(info, depends, tuple(apk_dirs(entries, apk)), apk_scripts(fields),
                      provides=(f"{name}-any",))
    path = os.path.join(outdir, f"{name}-{version}_{arch}.apk")
    _write(path, apk.write_package(pkg))
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
    builder = {"deb": build_deb, "ipk": build_ipk, "apk": build_apk}[kind]
    print(builder(tree, cpu, outdir, *(sys.argv[5:6])))
