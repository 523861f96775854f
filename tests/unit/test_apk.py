"""packaging/foreign/apk.py: APK v3 packages written and read back, apk's layout rules (sorted
arrays, trailing empty slots dropped, the unique id), and malformed input → ApkFormatError
naming the problem, never another exception. The package as OpenWrt's buildroot lays it out
(mkpkg.py apk) is in tests/unit/test_packages.py; apk-tools 3 itself checked the format once
(packaging/README.md)."""
from __future__ import annotations

import hashlib
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.packages import load_script

apk = load_script("apk")


def sample(description: str = "a demo", script: str = "#!/bin/sh\nexit 0\n") -> object:
    files = (apk.File("x", 0o755, b"hello\n", mtime=7), apk.File("y", 0o777, link="x"),
             apk.File("empty", 0o644, b""))
    return apk.Package(
        {"name": "demo", "version": "0.1.0-r1", "arch": "x86_64", "description": description,
         "license": "MIT", "origin": "package/net/demo", "url": "http://x", "maintainer": "me"},
        ("foo", "bar", "foo"),
        (apk.Dir("usr/bin", 0o755, files), apk.Dir("", 0o755), apk.Dir("etc/edgemesh", 0o700),
         apk.Dir("etc", 0o755, (apk.File("c", 0o600, b"cfg\n"),))),
        {"post-install": script, "pre-deinstall": "#!/bin/sh\n"})


def raw(blob: bytes) -> bytes:
    """The uncompressed ADB stream of a package."""
    assert blob[:4] == b"ADBd"
    return zlib.decompress(blob[4:], -15)


def repack(stream: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return b"ADBd" + c.compress(stream) + c.flush()


def test_round_trip_keeps_everything_in_apks_order() -> None:
    blob = apk.write_package(sample())
    pkg = apk.read_package(blob)
    assert pkg.info["name"] == "demo" and pkg.info["origin"] == "package/net/demo"
    assert pkg.depends == ("bar", "foo")  # sorted, unique: apk's dependency array
    assert [d.path for d in pkg.dirs] == ["", "etc", "etc/edgemesh", "usr/bin"]
    usr = pkg.dirs[3]
    assert [f.name for f in usr.files] == ["empty", "x", "y"]
    assert usr.files[1].data == b"hello\n" and usr.files[1].mode == 0o755
    assert usr.files[1].mtime == 7 and usr.files[2].link == "x"
    assert pkg.dirs[2].mode == 0o700 and pkg.dirs[1].user == "root"
    assert pkg.scripts == {"post-install": "#!/bin/sh\nexit 0\n", "pre-deinstall": "#!/bin/sh\n"}
    assert pkg.installed_size == len(b"hello\n") + len(b"cfg\n")
    assert apk.write_package(sample()) == blob  # reproducible


def test_unique_id_is_sha256_of_the_adb_block_with_it_zeroed() -> None:
    pkg = apk.read_package(apk.write_package(sample()))
    adb, _ = apk.adb_block(sample())
    zeroed = adb.replace(pkg.uid, bytes(20))
    assert len(pkg.uid) == 20 and hashlib.sha256(zeroed).digest()[:20] == pkg.uid


def test_file_layout_blocks_and_alignment() -> None:
    stream = raw(apk.write_package(sample()))
    assert stream[:8] == b"ADB.pckg"[:4] + struct.pack("<I", apk.SCHEMA_PACKAGE)
    kinds = [k for k, _ in apk.blocks(stream)]
    assert kinds == [apk.BLOCK_ADB, apk.BLOCK_DATA, apk.BLOCK_DATA]  # no data for empty files
    data = [p for k, p in apk.blocks(stream) if k == apk.BLOCK_DATA]
    assert struct.unpack_from("<II", data[0]) == (2, 1) and data[0][8:] == b"cfg\n"
    assert struct.unpack_from("<II", data[1]) == (4, 2) and data[1][8:] == b"hello\n"


@pytest.mark.parametrize("length", [1, 255, 256, 65535, 65536])
def test_blob_widths(length: int) -> None:
    text = "s" * length
    pkg = apk.read_package(apk.write_package(sample(script=text)))
    assert pkg.scripts["post-install"] == text


@pytest.mark.parametrize("n", [0, 1, 0x0FFFFFFF, 0x10000000, 0xFFFFFFFF, 1 << 32, (1 << 64) - 1])
def test_integer_widths(n: int) -> None:
    w = apk._Writer()
    v = w.int(n)
    assert apk._Reader(bytes(w.buf)).int(v) == n


def test_empty_objects_and_trailing_slots_are_left_out() -> None:
    w = apk._Writer()
    assert w.obj({1: apk.NULL, 2: apk.NULL}) == apk.NULL
    v = w.obj({1: w.int(5), 3: apk.NULL})
    assert apk._Reader(bytes(w.buf)).slots(v) == [2, w.int(5)]


# ---- malformed input --------------------------------------------------------------------------

def test_not_an_apk_v3() -> None:
    with pytest.raises(apk.ApkFormatError, match="not an APK v3 package"):
        apk.read_package(b"\x1f\x8b\x08\x00 an .ipk or a v2 .apk")


def test_truncated_or_corrupt_deflate() -> None:
    blob = apk.write_package(sample())
    with pytest.raises(apk.ApkFormatError, match="truncated"):
        apk.read_package(blob[:len(blob) // 2])
    with pytest.raises(apk.ApkFormatError, match="corrupt"):
        apk.read_package(b"ADBd" + b"\xff" * 64)


def test_wrong_schema() -> None:
    stream = bytearray(raw(apk.write_package(sample())))
    stream[4:8] = b"indx"
    with pytest.raises(apk.ApkFormatError, match="not a package"):
        apk.read_package(repack(bytes(stream)))


def test_content_not_matching_its_hash() -> None:
    stream = raw(apk.write_package(sample()))
    with pytest.raises(apk.ApkFormatError, match="usr/bin/x: content does not match"):
        apk.read_package(repack(stream.replace(b"hello\n", b"HELLO\n")))


def test_block_longer_than_the_file() -> None:
    stream = bytearray(raw(apk.write_package(sample())))
    struct.pack_into("<I", stream, 8, (apk.BLOCK_ADB << 30) | 0x3FFFFFF0)
    with pytest.raises(apk.ApkFormatError, match="claims"):
        apk.read_package(repack(bytes(stream)))


def test_offset_past_the_adb_block() -> None:
    stream = bytearray(raw(apk.write_package(sample())))
    struct.pack_into("<I", stream, 8 + 4 + 4, (apk.T_OBJECT << 28) | 0x0FFFFFF)  # the root
    with pytest.raises(apk.ApkFormatError, match="runs past the ADB block"):
        apk.read_package(repack(bytes(stream)))


def test_data_blocks_out_of_order_or_for_no_file() -> None:
    stream = raw(apk.write_package(sample()))
    found = apk.blocks(stream)
    head = stream[:8] + apk.block(apk.BLOCK_ADB, found[0][1])
    swapped = head + apk.block(apk.BLOCK_DATA, found[2][1]) + apk.block(apk.BLOCK_DATA,
                                                                       found[1][1])
    with pytest.raises(apk.ApkFormatError, match="not in directory/file order"):
        apk.read_package(repack(swapped))
    extra = stream + apk.block(apk.BLOCK_DATA, struct.pack("<II", 9, 9) + b"?")
    with pytest.raises(apk.ApkFormatError, match="data blocks for no file"):
        apk.read_package(repack(extra))


def test_unsafe_directory_name() -> None:
    evil = apk.Package({"name": "x", "version": "1-r0"}, (), (apk.Dir("etc/../../x", 0o755),), {})
    with pytest.raises(apk.ApkFormatError, match="unsafe directory name"):
        apk.read_package(apk.write_package(evil))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_packages_parse_or_fail_clearly(data: st.DataObject) -> None:
    stream = bytearray(raw(apk.write_package(sample())))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(stream) - 1))
        stream[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(8, len(stream)))
    try:
        apk.read_package(repack(bytes(stream[:cut])))
    except apk.ApkFormatError:
        pass


def test_values_are_shared_and_arrays_tagged_as_apk_mkpkg_writes_them() -> None:
    """What makes the package byte for byte the one apk-tools 3.0.6's ``apk mkpkg`` writes
    from the same tree (checked once with the real tool, packaging/README.md)."""
    adb, _ = apk.adb_block(sample())
    assert adb.count(b"\x04root") == 1  # every ACL names the one "root"
    r = apk._Reader(adb)
    root = struct.unpack_from("<I", adb, 4)[0]
    paths = r.field(root, apk.PKG_PATHS)
    deps = r.field(r.field(root, apk.PKG_INFO), apk.PI_FIELDS["depends"])
    assert paths >> 28 == deps >> 28 == apk.T_OBJECT
    acls = {r.field(d, apk.DIR_ACL) for d in r.items(paths) if r.int(r.field(
        r.field(d, apk.DIR_ACL), apk.ACL_MODE)) == 0o755}
    assert len(acls) == 1  # equal objects are one object
