"""Make a PyInstaller onedir build run on any Linux of its CPU, whatever its libc.

    python3 packaging/foreign/portable.py ONEDIR SYSROOT OUT

ONEDIR is ``dist/edgemesh-onedir`` (or an emulated build's copy), SYSROOT the root it was built
in (``/`` for this machine, ``build-foreign/rootfs-arm64`` for arm64). OUT receives an install
tree: ``usr/lib/edgemesh/`` (the onedir, plus ``glibc/``: the C library and dynamic loader the
build was linked against, copied from SYSROOT) and ``usr/bin/edgemesh`` (a symlink).

The executable's interpreter becomes ``/usr/lib/edgemesh/glibc/ld-linux-*.so.*`` and its
DT_RPATH ``$ORIGIN/glibc`` (``patchelf --force-rpath``: an RPATH on the executable also serves
what its libraries load, ``libpython`` included; a RUNPATH would not), so nothing of the host's
libc is used: it runs on musl (OpenWrt), on glibc older than the build's, or with no libc at
all. RUNPATHs that name the build machine are removed. The price: the install path is fixed
(the interpreter path is absolute), which the packages fix anyway. Needs ``readelf`` and
``patchelf`` (both read any CPU's ELF files).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable

PREFIX = "usr/lib/edgemesh"
LIBDIR = "glibc"
SEARCH = ("lib/{triplet}", "usr/lib/{triplet}", "lib", "usr/lib", "lib64", "usr/lib64")
TRIPLETS = ("x86_64-linux-gnu", "aarch64-linux-gnu", "arm-linux-gnueabihf")


def is_elf(path: str) -> bool:
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def _readelf(flag: str, path: str) -> str:
    return subprocess.run(["readelf", flag, "-W", path], capture_output=True, text=True,
                          check=True).stdout


def bracketed(text: str, marker: str) -> list[str]:
    """Values in ``[...]`` on readelf's lines holding ``marker`` (NEEDED, RUNPATH, ...)."""
    out = []
    for line in text.splitlines():
        if marker in line and "[" in line:
            out.append(line[line.index("[") + 1:line.rindex("]")])
    return out


def needed(path: str) -> list[str]:
    return bracketed(_readelf("-d", path), "(NEEDED)")


def interpreter(path: str) -> str:
    found = bracketed(_readelf("-l", path), "program interpreter")
    return found[0].split(": ", 1)[1] if found else ""


def find_library(name: str, sysroot: str) -> str:
    for pattern in SEARCH:
        for triplet in TRIPLETS:
            candidate = os.path.join(sysroot, pattern.format(triplet=triplet), name)
            if os.path.exists(candidate):
                return candidate
    raise SystemExit(f"{name}: not found under {sysroot}")


def elf_files(top: str) -> Iterable[str]:
    for dirpath, _, names in os.walk(top):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            if is_elf(path):
                yield path


def missing_libraries(bundle: str, exe: str, sysroot: str) -> dict[str, str]:
    """{soname: source} for what ``glibc/`` must hold: every library the bundle needs but
    does not carry (from ``sysroot``), followed transitively, and everything the executable
    itself needs (it loads them before the bootloader runs, through its RPATH alone; the
    bundle's own copy when there is one)."""
    carried = {n: os.path.join(d, n) for d, _, names in os.walk(bundle) for n in names}
    found: dict[str, str] = {name: carried.get(name) or find_library(name, sysroot)
                             for name in needed(exe)}
    queue = [name for path in [*elf_files(bundle), *found.values()] for name in needed(path)]
    while queue:
        name = queue.pop()
        if name in carried or name in found:
            continue
        found[name] = find_library(name, sysroot)
        queue.extend(needed(found[name]))
    return found


def make_portable(onedir: str, sysroot: str, out: str) -> str:
    """Write the install tree into ``out``; returns the executable's path in it."""
    top = os.path.join(out, PREFIX)
    if os.path.exists(top):
        shutil.rmtree(top)
    shutil.copytree(onedir, top, symlinks=True)
    exe = os.path.join(top, "edgemesh")
    interp = interpreter(exe)
    libs = missing_libraries(top, exe, sysroot)
    os.makedirs(os.path.join(top, LIBDIR))
    for name, src in sorted({**libs, os.path.basename(interp): sysroot + interp}.items()):
        shutil.copy(os.path.realpath(src), os.path.join(top, LIBDIR, name))
    for path in elf_files(top):
        if path != exe and any(not p.startswith("$ORIGIN")
                               for p in bracketed(_readelf("-d", path), "PATH)")):
            subprocess.run(["patchelf", "--remove-rpath", path], check=True)
    subprocess.run(["patchelf", "--set-interpreter",
                    f"/{PREFIX}/{LIBDIR}/{os.path.basename(interp)}",
                    "--force-rpath", "--set-rpath", f"$ORIGIN/{LIBDIR}", exe], check=True)
    link = os.path.join(out, "usr", "bin", "edgemesh")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink("../lib/edgemesh/edgemesh", link)
    return exe


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    print(make_portable(*sys.argv[1:4]))
