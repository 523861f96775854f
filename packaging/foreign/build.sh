#!/bin/bash
# Build the PyInstaller binaries for another CPU in an emulated Debian 12 root (qemu-user via
# binfmt_misc), the way `make binary` / `make onedir` build them for this one.
#
#   packaging/foreign/build.sh CPU [PHASE]     CPU: arm64 | armv7   PHASE: root | all (default)
#
# Writes dist/edgemesh-linux-CPU (onefile) and dist/edgemesh-linux-CPU-onedir/ (onedir).
# ARCH below is Debian's name for the CPU (armv7: armhf).
# Needs root (debootstrap, chroot, mounts). What is kept between runs, in $FOREIGN (default
# build-foreign/, git-ignored), so only the first run is slow:
#   rootfs-ARCH/   the Debian root (debootstrap; ~1.5 min under emulation)
#   wheels-ARCH/   every wheel the build needs: on armhf gevent, greenlet, cffi, PyYAML,
#                  zope.interface and pyinstaller have no wheel on PyPI and are compiled here
#                  once (~20 min); later runs install from this folder
#   rootfs-ARCH/opt/venv   the build venv, redone when constraints.txt or setup.cfg change
# PHASE=root stops after the venv (used to warm the cache; tests skip without it).
# The sources are the git-tracked files of the working tree, as `make binary` sees them.
set -euo pipefail
CPU=$1; PHASE=${2:-all}
case $CPU in arm64) ARCH=arm64 QEMU=aarch64;; armv7) ARCH=armhf QEMU=arm;;
  *) echo "CPU: arm64 or armv7" >&2; exit 2;; esac
REPO=$(cd "$(dirname "$0")/../.." && pwd)
FOREIGN=${FOREIGN:-$REPO/build-foreign}
ROOTFS=$FOREIGN/rootfs-$ARCH
WHEELS=${WHEELHOUSE:-$FOREIGN/wheels-$ARCH}
MIRROR=${MIRROR:-$(sed -n 's/^URIs: //p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || { echo "building for $ARCH needs root (debootstrap, chroot)" >&2; exit 2; }
step() { local s=$SECONDS; "$@"; echo "  [$((SECONDS - s)) s] $*" | cut -c1-120 >&2; }

# 1. qemu-user + binfmt_misc. Flag F (set by Debian's package): the interpreter is opened when
#    registered, so the root needs no qemu binary of its own.
command -v debootstrap >/dev/null && [ -x /usr/bin/qemu-$QEMU-static ] ||
  step env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support debootstrap >/dev/null
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-$QEMU ] || update-binfmts --enable qemu-$QEMU

# 2. The root: libpython3.11 (PyInstaller stops without the shared library), binutils (its
#    objdump), iproute2 (the smoke agent lists addresses with `ip`); compilers on armhf only.
PKGS=python3,python3-venv,libpython3.11,binutils,ca-certificates,iproute2
[ "$ARCH" = armhf ] && PKGS=$PKGS,python3-dev,gcc,g++,make,libffi-dev,zlib1g-dev
if [ ! -e "$ROOTFS/.debootstrap-done" ]; then
  rm -rf "$ROOTFS"; mkdir -p "$FOREIGN"
  step debootstrap --arch="$ARCH" --variant=minbase --include="$PKGS" bookworm "$ROOTFS" "$MIRROR" >/dev/null
  touch "$ROOTFS/.debootstrap-done"
fi

unmount() { for m in wheelhouse src/dist tmp dev proc; do
  mountpoint -q "$ROOTFS/$m" && umount -l "$ROOTFS/$m"; done; return 0; }
trap unmount EXIT
unmount
mount -t proc proc "$ROOTFS/proc"; mount --bind /dev "$ROOTFS/dev"
# tmpfs /tmp: a 32-bit guest under qemu cannot list ext4 directories (the host kernel hands
# qemu 64-bit hash cookies), so onefile would leave its unpacked _MEI directory behind
mount -t tmpfs -o size=512m tmpfs "$ROOTFS/tmp"
mkdir -p "$WHEELS" "$ROOTFS/wheelhouse"; mount --bind "$WHEELS" "$ROOTFS/wheelhouse"
cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
# the host's CA bundle: on a network that intercepts TLS its CA is only there (without it pip
# prints "Could not fetch URL" and still exits 0 on the upgrade step)
cp -L /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/host-ca-bundle.crt"
in_root() { chroot "$ROOTFS" env -i HOME=/root LANG=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
  PIP_FIND_LINKS=/wheelhouse "$@"; }

# 3. The sources: tracked files of the working tree (uncommitted edits included, as for
#    `make binary`), at /src; the venv outside them at /opt/venv.
rm -rf "$ROOTFS/src"; mkdir -p "$ROOTFS/src"
git -C "$REPO" ls-files -z | (cd "$REPO" && tar --null -T - --ignore-failed-read -cf - 2>/dev/null) |
  tar -x -C "$ROOTFS/src"
KEY=$(cat "$REPO/constraints.txt" "$REPO/setup.cfg" "$REPO/pyproject.toml" | sha256sum | cut -c1-16)
if [ "$(cat "$ROOTFS/opt/venv/.key" 2>/dev/null)" != "$KEY" ]; then
  rm -rf "$ROOTFS/opt/venv"
  step in_root sh -c 'python3 -m venv /opt/venv && /opt/venv/bin/pip install -q --upgrade pip'
  # every wheel into the kept wheelhouse first (downloads; on armhf, compiles what PyPI lacks),
  # then the install from it (PIP_FIND_LINKS), wheels only
  step in_root sh -c 'cd /src && /opt/venv/bin/pip wheel -q -w /wheelhouse -c constraints.txt ".[build]"'
  step in_root sh -c 'cd /src && /opt/venv/bin/pip install -q --only-binary=:all: \
    -c constraints.txt -e ".[build]"'
  echo "$KEY" > "$ROOTFS/opt/venv/.key"
fi
[ "$PHASE" = root ] && exit 0

# 4. The builds, as the Makefile's `binary` and `onedir` targets run them
for bundle in onefile onedir; do
  step in_root sh -c "cd /src && PYTHONHASHSEED=0 EDGEMESH_BUNDLE=$bundle /opt/venv/bin/pyinstaller \
    --noconfirm --clean --log-level ERROR --distpath dist --workpath build-pyinstaller/$bundle \
    packaging/edgemesh.spec"
done
OUT=$REPO/dist/edgemesh-linux-$CPU
mkdir -p "$REPO/dist"
cp "$ROOTFS/src/dist/edgemesh" "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
rm -rf "$OUT-onedir" && cp -a "$ROOTFS/src/dist/edgemesh-onedir" "$OUT-onedir"
ls -l "$OUT"
