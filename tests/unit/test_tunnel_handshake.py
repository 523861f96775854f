"""The Noise XXpsk0 handshake, the record layer and identity files, without a network."""
from __future__ import annotations

import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edgemesh.errors import ConfigError, RemoteProtocolError
from edgemesh.tunnel import identity
from edgemesh.tunnel.handshake import Handshake, HandshakeFailed, Hello, public_bytes
from edgemesh.tunnel.records import RecordReader, SecureChannel, frame_record
from edgemesh.tunnel.x25519 import StaticKey

PSK = identity.psk_from_bytes(b"a cluster secret of some length")


def run_handshake(psk_i: bytes = PSK, psk_r: bytes = PSK, *, tamper: int | None = None,
                  si: StaticKey | X25519PrivateKey | None = None):
    si, sr = si or StaticKey.generate(), StaticKey.generate()
    i = Handshake(True, si, psk_i, Hello("node-a", intent="session"))
    r = Handshake(False, sr, psk_r, Hello("node-b", role="server"))
    for step in range(3):
        writer, reader = (i, r) if step % 2 == 0 else (r, i)
        msg = bytearray(writer.write_message())
        if tamper == step:
            msg[-1] ^= 1
        reader.read_message(bytes(msg))
    return i, r, si, sr


def test_both_sides_learn_the_proven_static_key_and_hello():
    i, r, si, sr = run_handshake()
    assert i.done and r.done
    assert i.result.remote_static == public_bytes(sr)
    assert r.result.remote_static == public_bytes(si)
    assert i.result.remote_hello.node == "node-b" and i.result.remote_hello.role == "server"
    assert r.result.remote_hello.node == "node-a"
    assert i.result.handshake_hash == r.result.handshake_hash


def test_a_cryptography_key_works_as_the_static_key():
    key = X25519PrivateKey.generate()
    i, r, *_ = run_handshake(si=key)
    assert r.result.remote_static == public_bytes(key) == public_bytes(key.public_key())
    assert public_bytes(StaticKey(key.private_bytes_raw())) == public_bytes(key)


def test_transport_keys_work_both_ways_and_detect_tampering():
    i, r, *_ = run_handshake()
    a = SecureChannel(i.result.send, i.result.recv)
    b = SecureChannel(r.result.send, r.result.recv)
    reader = RecordReader()
    reader.feed(a.seal(b"hello") + a.seal(b"world"))
    assert b.open(reader.next_record()) == b"hello"
    assert b.open(reader.next_record()) == b"world"
    assert a.open(b.seal(b"back")[2:]) == b"back"
    rec = bytearray(a.seal(b"x")[2:])
    rec[0] ^= 0xFF
    with pytest.raises(RemoteProtocolError):
        b.open(bytes(rec))


def test_the_transport_is_not_plaintext():
    i, r, *_ = run_handshake()
    sealed = SecureChannel(i.result.send, i.result.recv).seal(b"secret payload" * 10)
    assert b"secret payload" not in sealed


@pytest.mark.parametrize("step", [0, 1, 2])
def test_tampered_handshake_messages_are_refused(step):
    with pytest.raises(RemoteProtocolError):
        run_handshake(tamper=step)


def test_a_wrong_psk_fails_at_the_first_message():
    si, sr = StaticKey.generate(), StaticKey.generate()
    i = Handshake(True, si, identity.psk_from_bytes(b"not the cluster secret!!"), Hello("x"))
    r = Handshake(False, sr, PSK, Hello("y"))
    with pytest.raises(HandshakeFailed):
        r.read_message(i.write_message())


def test_hello_rejects_garbage():
    for bad in (b"", b"[]", b'{"v":2,"node":"a"}', b'{"v":1,"node":""}',
                b'{"v":1,"node":"a","role":"root"}', b'{"v":1,"node":"a","window":1}'):
        with pytest.raises(RemoteProtocolError):
            Hello.decode(bad)
    assert Hello.decode(Hello("n", extra={"x": 1}).encode()).extra == {"x": 1}


def test_record_reader_handles_split_input():
    data = frame_record(b"abc") + frame_record(b"") + frame_record(b"z" * 70)
    reader = RecordReader()
    out = []
    for byte in data:
        reader.feed(bytes([byte]))
        while (rec := reader.next_record()) is not None:
            out.append(rec)
    assert out == [b"abc", b"", b"z" * 70]
    reader.feed(b"\x00\x05ab")
    assert reader.next_record() is None and reader.wanted() == 3
    assert reader.leftover() == b"\x00\x05ab"


def test_key_is_created_once_with_mode_0600(tmp_path):
    k1 = identity.load_or_create_key(str(tmp_path))
    k2 = identity.load_or_create_key(str(tmp_path))
    assert public_bytes(k1) == public_bytes(k2)
    mode = stat.S_IMODE(os.stat(tmp_path / "tunnel.key").st_mode)
    assert mode == 0o600
    other = identity.load_or_create_key(str(tmp_path / "other"))
    assert public_bytes(other) != public_bytes(k1)
    # the file holds the raw private key; cryptography derives the same public key from it
    raw = (tmp_path / "tunnel.key").read_bytes()
    assert k1.private == raw
    assert X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw() == k1.public


def test_psk_file_whitespace_does_not_matter_and_short_secrets_are_refused(tmp_path):
    (tmp_path / "a").write_bytes(b"0123456789abcdef0123\n")
    (tmp_path / "b").write_bytes(b"0123456789abcdef0123")
    assert identity.load_psk(str(tmp_path / "a")) == identity.load_psk(str(tmp_path / "b"))
    (tmp_path / "c").write_bytes(b"short")
    with pytest.raises(ConfigError):
        identity.load_psk(str(tmp_path / "c"))
    with pytest.raises(ConfigError):
        identity.load_psk(str(tmp_path / "missing"))


def test_bindings_refuse_a_second_key_until_released(tmp_path):
    path = str(tmp_path / "bindings.json")
    b = identity.Bindings(path)
    assert b.check("n1", b"\x01" * 32)
    assert b.check("n1", b"\x01" * 32)
    assert not b.check("n1", b"\x02" * 32)
    # a new process (a restart) remembers
    assert not identity.Bindings(path).check("n1", b"\x02" * 32)
    # the operator releases from another process; the running one sees it
    assert identity.release_binding(str(tmp_path), "n1")
    assert b.check("n1", b"\x02" * 32)
    assert b.key_of("n1") == (b"\x02" * 32).hex()


@pytest.mark.parametrize("offers, chosen", [
    ((("aesgcm", "chachapoly"), ("aesgcm", "chachapoly")), "aesgcm"),
    ((("aesgcm", "chachapoly"), ("chachapoly",)), "chachapoly"),
    ((("chachapoly",), ("aesgcm",)), "chachapoly"),
])
def test_the_transport_aead_is_aesgcm_only_when_both_hellos_offer_it(offers, chosen):
    i = Handshake(True, StaticKey.generate(), PSK, Hello("node-a", aead=offers[0]))
    r = Handshake(False, StaticKey.generate(), PSK, Hello("node-b", aead=offers[1]))
    for step in range(3):
        writer, reader = (i, r) if step % 2 == 0 else (r, i)
        reader.read_message(writer.write_message())
    assert i.result.send.aead == r.result.recv.aead == chosen
    a = SecureChannel(i.result.send, i.result.recv)
    b = SecureChannel(r.result.send, r.result.recv)
    record = bytearray(2 + 5 + 16)
    record[2:7] = b"hello"
    a.seal_in_place(memoryview(record))  # the bulk path: sealed over itself
    reader = RecordReader()
    reader.feed(bytes(record) + a.seal(b"world"))
    assert b.open(reader.next_view()) == b"hello"
    assert b.open(reader.next_record()) == b"world"


def test_a_reader_taken_for_a_small_read_grows_when_a_record_needs_it() -> None:
    from edgemesh.tunnel.records import SMALL_BUFFER
    big, small = b"x" * 60000, b"hi"
    wire = frame_record(small) + frame_record(big) + frame_record(small)
    reader = RecordReader()
    got: list[bytes] = []
    at, hint = 0, 10  # the first read: 10 bytes were waiting
    while at < len(wire):
        space = reader.space(hint)
        hint = 0
        assert len(space) >= 1
        if at == 0:
            assert len(space) == SMALL_BUFFER  # a small buffer for a small read
        k = min(len(space), len(wire) - at, 7000)
        space[:k] = wire[at:at + k]
        reader.commit(k)
        at += k
        while (rec := reader.next_record()) is not None:
            got.append(rec)
    assert got == [small, big, small]
    reader.release()
    assert not reader.holding
