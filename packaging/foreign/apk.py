"""APK v3 packages (what OpenWrt 25.12+ installs), written and read with the standard library.

An APK v3 file is "ADB" data (apk-tools 3's own binary format; ``doc/apk-v3.5`` in apk-tools):
``ADBd`` + a raw-deflate stream of: the file header (``ADB.`` + the schema, ``pckg``), one ADB
block holding the package object (info, directories with their files and ACLs, scripts), no
SIG block (unsigned: ``apk add --allow-untrusted``), then one DATA block per non-empty regular
file, in directory then file order. Blocks start with a little-endian u32 (2 bits of type,
30 of size including itself) and are padded to 8 bytes. Inside the ADB block, a value is a u32
tag (4 bits of type, 28 of immediate value or offset into the block): integers up to 2**28-1
are immediate, longer ones and blobs (u8/u16/u32 length + bytes) and objects/arrays (u32 count
+ slots, slot 0 being the count) live at an aligned offset. Arrays that apk keeps sorted
(directories, files, dependencies) are written sorted. The package's unique id (``hashes``)
is the first 20 bytes of the SHA-256 of the ADB block written with that field zeroed, as
``apk mkpkg`` does. Values are written in ``apk mkpkg``'s order and repeated ones shared as
it shares them, so a package is byte for byte what apk-tools 3.0.6 writes from the same tree
(checked once with the real tool: packaging/README.md).

:func:`write_package` builds the bytes; :func:`read_package` parses them back (used by the
tests, which install a package as apk would) and raises :class:`ApkFormatError` naming what is
wrong in malformed input.
"""
from __future__ import annotations

import dataclasses
import hashlib
import struct
import zlib

SCHEMA_PACKAGE = 0x676B6370  # "pckg"
MAGIC = b"ADB."
COMPRESSED = b"ADBd"  # + raw deflate
BLOCK_ADB, BLOCK_SIG, BLOCK_DATA, BLOCK_EXT = 0, 1, 2, 3
UID_LEN = 20

T_SPECIAL, T_INT, T_INT32, T_INT64 = 0x0, 0x1, 0x2, 0x3
T_BLOB8, T_BLOB16, T_BLOB32, T_ARRAY, T_OBJECT = 0x8, 0x9, 0xA, 0xD, 0xE
NULL = 0

# field slots of the schemas (apk-tools src/apk_adb.h)
PI_FIELDS = {"name": 1, "version": 2, "hashes": 3, "description": 4, "arch": 5, "license": 6,
             "origin": 7, "maintainer": 8, "url": 9, "installed-size": 12, "depends": 15,
             "provides": 16}
SCRIPTS = ("trigger", "pre-install", "post-install", "pre-deinstall", "post-deinstall",
           "pre-upgrade", "post-upgrade")
PKG_INFO, PKG_PATHS, PKG_SCRIPTS = 1, 2, 3
DIR_NAME, DIR_ACL, DIR_FILES = 1, 2, 3
FILE_NAME, FILE_ACL, FILE_SIZE, FILE_MTIME, FILE_HASH, FILE_TARGET = 1, 2, 3, 4, 5, 6
ACL_MODE, ACL_USER, ACL_GROUP = 1, 2, 3
DEP_NAME = 1
S_IFLNK = 0o120000


class ApkFormatError(ValueError):
    """The bytes are not an APK v3 package this module understands; the message says why."""


@dataclasses.dataclass(frozen=True)
class File:
    """A regular file (``data``) or a symlink (``link``) in a directory of the package."""

    name: str
    mode: int
    data: bytes = b""
    link: str = ""
    mtime: int = 0
    sha256: bytes = b""  # as read (the writer computes it)


@dataclasses.dataclass(frozen=True)
class Dir:
    path: str  # "" is the root
    mode: int
    files: tuple[File, ...] = ()
    user: str = "root"
    group: str = "root"


@dataclasses.dataclass(frozen=True)
class Package:
    """What an .apk holds. ``info`` keys are :data:`PI_FIELDS`' text fields."""

    info: dict[str, str]
    depends: tuple[str, ...]
    dirs: tuple[Dir, ...]
    scripts: dict[str, str]
    provides: tuple[str, ...] = ()
    uid: bytes = b""
    installed_size: int = 0


# ---- writing ---------------------------------------------------------------------------------

class _Writer:
    """The ADB block being built: values appended at aligned offsets after the 8-byte header.
    A value whose bytes were written before, at an offset fit for its alignment, is shared,
    as apk-tools' writer does."""

    def __init__(self) -> None:
        self.buf = bytearray(8)
        self.written: dict[bytes, int] = {}

    def put(self, data: bytes, align: int, share: bool = True) -> int:
        seen = self.written.get(data) if share else None
        if seen is not None and seen % align == 0:
            return seen
        self.buf += bytes(-len(self.buf) % align)
        offset = len(self.buf)
        if offset > 0x0FFFFFFF:
            raise ApkFormatError("ADB block over 256 MiB")
        self.buf += data
        if share:
            self.written[data] = offset
        return offset

    def int(self, n: int) -> int:
        if n < 0x10000000:
            return (T_INT << 28) | n
        if n < 1 << 32:
            return (T_INT32 << 28) | self.put(struct.pack("<I", n), 4)
        return (T_INT64 << 28) | self.put(struct.pack("<Q", n), 4)

    def blob(self, data: bytes | str, share: bool = True) -> int:
        raw = data.encode() if isinstance(data, str) else data
        if not raw:
            return NULL
        if len(raw) <= 0xFF:
            return (T_BLOB8 << 28) | self.put(struct.pack("<B", len(raw)) + raw, 1, share)
        if len(raw) <= 0xFFFF:
            return (T_BLOB16 << 28) | self.put(struct.pack("<H", len(raw)) + raw, 2, share)
        return (T_BLOB32 << 28) | self.put(struct.pack("<I", len(raw)) + raw, 4, share)

    def obj(self, fields: dict[int, int], kind: int = T_OBJECT) -> int:
        """An object from {slot: value}; trailing empty slots are left out, as apk does."""
        slots = [fields.get(i, NULL) for i in range(1, max(fields, default=0) + 1)]
        while slots and slots[-1] == NULL:
            slots.pop()
        if not slots:
            return NULL
        data = struct.pack(f"<{len(slots) + 1}I", len(slots) + 1, *slots)
        return (kind << 28) | self.put(data, 4)

    def arr(self, items: list[int], kind: int = T_ARRAY) -> int:
        """An array (``apk mkpkg`` tags the arrays it stores as object fields T_OBJECT;
        readers take either)."""
        return self.obj(dict(enumerate((v for v in items if v != NULL), 1)), kind)


def _acl(w: _Writer, mode: int, user: str, group: str) -> int:
    mode_v = w.int(mode & 0o7777)
    user_v = w.blob(user)
    return w.obj({ACL_MODE: mode_v, ACL_USER: user_v, ACL_GROUP: w.blob(group)})


def _file(w: _Writer, f: File) -> int:
    """A file's object, its values written in ``apk mkpkg``'s order."""
    fields = {FILE_NAME: w.blob(f.name)}
    raw = f.link.encode() if f.link else f.data
    if f.link:
        fields[FILE_TARGET] = w.blob(struct.pack("<H", S_IFLNK) + raw)
    else:
        fields[FILE_HASH] = w.blob(hashlib.sha256(raw).digest())
    fields[FILE_MTIME] = w.int(f.mtime)
    fields[FILE_SIZE] = w.int(len(raw))
    fields[FILE_ACL] = _acl(w, f.mode, "root", "root")
    return w.obj(fields)


def _names(w: _Writer, names: tuple[str, ...]) -> int:
    """A dependency array of bare names, sorted and unique as apk keeps it."""
    deps = {w.obj({DEP_NAME: w.blob(d)}): d.encode() for d in names}
    return w.arr(sorted(deps, key=deps.__getitem__), T_OBJECT)


def sorted_dirs(dirs: list[Dir] | tuple[Dir, ...]) -> list[Dir]:
    """Directories and their files in apk's order (byte order of the names)."""
    return [dataclasses.replace(d, files=tuple(sorted(d.files, key=lambda f: f.name.encode())))
            for d in sorted(dirs, key=lambda d: d.path.encode())]


def adb_block(pkg: Package) -> tuple[bytes, list[Dir]]:
    """The ADB block's payload for ``pkg`` (unique id filled in), and the directories in the
    order its DATA blocks follow. Values are written in the order ``apk mkpkg`` (apk-tools
    3.0.6) writes them, so the same package comes out byte for byte the same."""
    dirs = sorted_dirs(pkg.dirs)
    w = _Writer()
    info = {slot: w.blob(pkg.info[name]) for name, slot in sorted(PI_FIELDS.items(),
                                                                  key=lambda kv: kv[1])
            if pkg.info.get(name)}
    info[PI_FIELDS["depends"]] = _names(w, pkg.depends)
    info[PI_FIELDS["provides"]] = _names(w, pkg.provides)
    paths = []
    for d in dirs:
        files = [_file(w, f) for f in d.files]
        name = w.blob(d.path)
        acl = _acl(w, d.mode, d.user, d.group)
        paths.append(w.obj({DIR_NAME: name, DIR_ACL: acl, DIR_FILES: w.arr(files, T_OBJECT)}))
    size = sum(len(f.data) for d in dirs for f in d.files if not f.link)
    info[PI_FIELDS["installed-size"]] = w.int(size or 1)
    uid_at = w.put(struct.pack("<B", UID_LEN) + bytes(UID_LEN), 1, share=False)
    info[PI_FIELDS["hashes"]] = (T_BLOB8 << 28) | uid_at
    root = {PKG_INFO: w.obj(info), PKG_PATHS: w.arr(paths, T_OBJECT)}
    scripts = {i: w.blob(pkg.scripts[name]) for i, name in enumerate(SCRIPTS, 1)
               if name in pkg.scripts}
    root[PKG_SCRIPTS] = w.obj(scripts)
    struct.pack_into("<BBHI", w.buf, 0, 0, 0, 0, w.obj(root))
    uid = hashlib.sha256(w.buf).digest()[:UID_LEN]
    w.buf[uid_at + 1:uid_at + 1 + UID_LEN] = uid
    return bytes(w.buf), dirs


def block(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    if size > 0x3FFFFFFF:
        raise ApkFormatError(f"a block of {size} bytes needs the extended header (not written)")
    return struct.pack("<I", (kind << 30) | size) + payload + bytes(-size % 8)


def write_package(pkg: Package) -> bytes:
    """The .apk bytes for ``pkg``: deterministic for the same input (mtimes come from it)."""
    adb, dirs = adb_block(pkg)
    parts = [MAGIC, struct.pack("<I", SCHEMA_PACKAGE), block(BLOCK_ADB, adb)]
    for i, d in enumerate(dirs, 1):
        for j, f in enumerate(d.files, 1):
            if f.data and not f.link:
                parts.append(block(BLOCK_DATA, struct.pack("<II", i, j) + f.data))
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    return COMPRESSED + deflate.compress(b"".join(parts)) + deflate.flush()


# ---- reading ---------------------------------------------------------------------------------

class _Reader:
    """Values of an ADB block, every offset and length checked against its size."""

    def __init__(self, adb: bytes) -> None:
        self.adb = adb

    def _at(self, offset: int, size: int, what: str) -> bytes:
        if offset + size > len(self.adb):
            raise ApkFormatError(f"{what} at offset {offset} runs past the ADB block "
                                 f"({len(self.adb)} bytes)")
        return self.adb[offset:offset + size]

    def int(self, v: int) -> int:
        kind, value = v >> 28, v & 0x0FFFFFFF
        if v == NULL:
            return 0
        if kind == T_INT:
            return value
        if kind == T_INT32:
            return int(struct.unpack("<I", self._at(value, 4, "an integer"))[0])
        if kind == T_INT64:
            return int(struct.unpack("<Q", self._at(value, 8, "an integer"))[0])
        raise ApkFormatError(f"expected an integer, found a value of type {kind:#x}")

    def blob(self, v: int) -> bytes:
        kind, offset = v >> 28, v & 0x0FFFFFFF
        if v == NULL:
            return b""
        widths = {T_BLOB8: "<B", T_BLOB16: "<H", T_BLOB32: "<I"}
        if kind not in widths:
            raise ApkFormatError(f"expected a blob, found a value of type {kind:#x}")
        fmt = widths[kind]
        (size,) = struct.unpack(fmt, self._at(offset, struct.calcsize(fmt), "a blob length"))
        return self._at(offset + struct.calcsize(fmt), size, "a blob")

    def text(self, v: int) -> str:
        return _utf8(self.blob(v), "a text field")

    def slots(self, v: int) -> list[int]:
        """An object's or array's slots, 1-based as apk numbers them (index 0 unused)."""
        if v == NULL:
            return [NULL]
        kind, offset = v >> 28, v & 0x0FFFFFFF
        if kind not in (T_ARRAY, T_OBJECT):
            raise ApkFormatError(f"expected an object or array, found type {kind:#x}")
        (count,) = struct.unpack("<I", self._at(offset, 4, "an object"))
        if count == 0:
            raise ApkFormatError(f"an object at offset {offset} has no slot count")
        return list(struct.unpack(f"<{count}I", self._at(offset, 4 * count, "an object")))

    def field(self, v: int, slot: int) -> int:
        fields = self.slots(v)
        return fields[slot] if slot < len(fields) else NULL

    def items(self, v: int) -> list[int]:
        return self.slots(v)[1:]


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise ApkFormatError(f"{what} is not UTF-8: {e}") from None


def _inflate(blob: bytes) -> bytes:
    if blob[:4] == MAGIC:
        return blob
    if blob[:4] != COMPRESSED:
        raise ApkFormatError(f"not an APK v3 package: starts with {blob[:4]!r}, not b'ADBd' or "
                             "b'ADB.' (a v2 .apk or an .ipk is a gzip'd tar)")
    inflate = zlib.decompressobj(-15)
    try:
        raw = inflate.decompress(blob[4:]) + inflate.flush()
    except zlib.error as e:
        raise ApkFormatError(f"the deflate stream is corrupt: {e}") from None
    if not inflate.eof:
        raise ApkFormatError("the deflate stream is truncated")
    return raw


def blocks(raw: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of every block after the file header, sizes and padding checked."""
    out, pos = [], 8
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ApkFormatError(f"truncated block header at offset {pos}")
        (word,) = struct.unpack_from("<I", raw, pos)
        kind, size = word >> 30, word & 0x3FFFFFFF
        if kind == BLOCK_EXT:
            raise ApkFormatError("extended (> 1 GiB) blocks are not supported")
        if size < 4 or pos + size + (-size % 8) > len(raw):
            raise ApkFormatError(f"block at offset {pos} claims {size} bytes, "
                                 f"{len(raw) - pos} remain")
        out.append((kind, raw[pos + 4:pos + size]))
        pos += size + (-size % 8)
    return out


def read_package(blob: bytes) -> Package:
    """Parse an unsigned or signed APK v3 package (signatures are not checked); every regular
    file's content is checked against its SHA-256."""
    raw = _inflate(blob)
    if len(raw) < 8 or raw[:4] != MAGIC:
        raise ApkFormatError("no ADB file header after decompression")
    (schema,) = struct.unpack_from("<I", raw, 4)
    if schema != SCHEMA_PACKAGE:
        raise ApkFormatError(f"schema {schema:#010x} is not a package ('pckg')")
    found = blocks(raw)
    if not found or found[0][0] != BLOCK_ADB:
        raise ApkFormatError("the first block is not the ADB block")
    kinds = [k for k, _ in found[1:]]
    if BLOCK_ADB in kinds or kinds != sorted(kinds):
        raise ApkFormatError(f"blocks out of order (ADB, SIG..., DATA... expected): {kinds}")
    adb = found[0][1]
    if len(adb) < 8:
        raise ApkFormatError("the ADB block is shorter than its header")
    compat, _version, _, root = struct.unpack_from("<BBHI", adb)
    if compat != 0:
        raise ApkFormatError(f"ADB compat version {compat} (only 0 exists)")
    r = _Reader(adb)
    pkg = r.field(root, PKG_INFO)
    info = {name: r.text(r.field(pkg, slot)) for name, slot in PI_FIELDS.items()
            if name not in ("hashes", "installed-size", "depends", "provides")}
    info = {k: v for k, v in info.items() if v}
    for required in ("name", "version"):
        if required not in info:
            raise ApkFormatError(f"the package has no {required}")
    depends, provides = (tuple(r.text(r.field(d, DEP_NAME))
                               for d in r.items(r.field(pkg, PI_FIELDS[field])))
                         for field in ("depends", "provides"))
    scripts_v = r.field(root, PKG_SCRIPTS)
    scripts = {name: r.text(r.field(scripts_v, i + 1)) for i, name in enumerate(SCRIPTS)}
    data = {(i, j): payload for i, j, payload in _data_blocks(found)}
    dirs = tuple(_read_dir(r, v, i, data)
                 for i, v in enumerate(r.items(r.field(root, PKG_PATHS)), 1))
    if data:
        raise ApkFormatError(f"data blocks for no file: {sorted(data)}")
    return Package(info, depends, dirs, {k: v for k, v in scripts.items() if v}, provides,
                   r.blob(r.field(pkg, PI_FIELDS["hashes"])),
                   r.int(r.field(pkg, PI_FIELDS["installed-size"])))


def _data_blocks(found: list[tuple[int, bytes]]) -> list[tuple[int, int, bytes]]:
    out = []
    for kind, payload in found:
        if kind == BLOCK_DATA:
            if len(payload) < 8:
                raise ApkFormatError("a data block is shorter than its header")
            i, j = struct.unpack_from("<II", payload)
            out.append((i, j, payload[8:]))
    if [(i, j) for i, j, _ in out] != sorted((i, j) for i, j, _ in out):
        raise ApkFormatError("data blocks are not in directory/file order")
    return out


def _acl_of(r: _Reader, acl: int) -> tuple[int, str, str]:
    return (r.int(r.field(acl, ACL_MODE)), r.text(r.field(acl, ACL_USER)),
            r.text(r.field(acl, ACL_GROUP)))


def _safe_name(name: str, what: str) -> str:
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or "" in parts and name:
        raise ApkFormatError(f"unsafe {what} name {name!r}")
    return name


def _read_dir(r: _Reader, v: int, i: int, data: dict[tuple[int, int], bytes]) -> Dir:
    path = _safe_name(r.text(r.field(v, DIR_NAME)), "directory")
    mode, user, group = _acl_of(r, r.field(v, DIR_ACL))
    files = []
    for j, fv in enumerate(r.items(r.field(v, DIR_FILES)), 1):
        name = r.text(r.field(fv, FILE_NAME))
        if not name or "/" in name or name in (".", ".."):
            raise ApkFormatError(f"bad file name {name!r} in directory {path!r}")
        fmode = _acl_of(r, r.field(fv, FILE_ACL))[0]
        size, target = r.int(r.field(fv, FILE_SIZE)), r.blob(r.field(fv, FILE_TARGET))
        mtime = r.int(r.field(fv, FILE_MTIME))
        if target:
            if len(target) < 2 or struct.unpack_from("<H", target)[0] != S_IFLNK:
                raise ApkFormatError(f"{path}/{name}: only symlink targets are supported")
            files.append(File(name, fmode, link=_utf8(target[2:], f"{path}/{name}"),
                              mtime=mtime))
            continue
        content = data.pop((i, j), b"")
        digest = r.blob(r.field(fv, FILE_HASH))
        if len(content) != size:
            raise ApkFormatError(f"{path}/{name}: {len(content)} bytes of data for size {size}")
        if hashlib.sha256(content).digest() != digest:
            raise ApkFormatError(f"{path}/{name}: content does not match its SHA-256")
        files.append(File(name, fmode, content, mtime=mtime, sha256=digest))
    return Dir(path, mode, tuple(files), user, group)
