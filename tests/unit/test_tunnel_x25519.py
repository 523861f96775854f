"""The pure-Python X25519 that derives the node's public key, and the lazy ``cryptography``.

The ladder is checked against RFC 7748's vectors and against ``cryptography`` for random keys;
a subprocess shows that loading the tunnel module and the node identity imports no
``cryptography`` until the first handshake.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from edgemesh.tunnel.x25519 import BASE_POINT, StaticKey, clamp, public_key, x25519
from tests.procs import ROOT

# RFC 7748 §5.2: (scalar, input u, output u)
SCALAR_MULT = [
    ("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
     "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
     "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
    # u has its top bit set: it must be masked, not rejected
    ("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
     "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
     "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
]
# RFC 7748 §6.1
ALICE = ("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
         "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB = ("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
       "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


@pytest.mark.parametrize("scalar, u, out", SCALAR_MULT)
def test_rfc7748_scalar_multiplication_vectors(scalar: str, u: str, out: str) -> None:
    assert x25519(bytes.fromhex(scalar), bytes.fromhex(u)).hex() == out


def test_rfc7748_iterated_vector() -> None:
    k = u = BASE_POINT
    for i in range(1000):
        k, u = x25519(k, u), k
        if i == 0:
            assert k.hex() == "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"
    assert k.hex() == "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"


def test_rfc7748_diffie_hellman_keys() -> None:
    for private, public in (ALICE, BOB):
        assert public_key(bytes.fromhex(private)).hex() == public
    assert x25519(bytes.fromhex(ALICE[0]), bytes.fromhex(BOB[1])).hex() == SHARED
    assert x25519(bytes.fromhex(BOB[0]), bytes.fromhex(ALICE[1])).hex() == SHARED


def test_clamping() -> None:
    k = clamp(b"\xff" * 32)
    assert k & 7 == 0 and k >> 254 == 1
    assert clamp(b"\x00" * 32) == 1 << 254
    # the clamped-away bits do not change the public key
    raw = bytearray(os.urandom(32))
    flipped = bytearray(raw)
    flipped[0] ^= 7
    flipped[31] ^= 0xC0
    assert public_key(bytes(raw)) == public_key(bytes(flipped))
    with pytest.raises(ValueError):
        public_key(b"short")


def test_public_keys_match_cryptography_for_random_keys() -> None:
    for _ in range(64):
        raw = os.urandom(32)
        theirs = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
        assert public_key(raw) == theirs


def test_static_key_dh_agrees_with_cryptography() -> None:
    ours, theirs = StaticKey.generate(), X25519PrivateKey.generate()
    peer_public = theirs.public_key()
    shared = ours.dh_key().exchange(peer_public)
    assert shared == theirs.exchange(X25519PublicKey.from_public_bytes(ours.public))
    assert ours.dh_key() is ours.dh_key()  # made once
    wrapped = StaticKey.from_cryptography(theirs)
    assert wrapped.public == peer_public.public_bytes_raw() and wrapped.dh_key() is theirs
    assert ours.private.hex() not in repr(ours) and ours.public.hex()[:16] in repr(ours)


# Runs in a fresh interpreter: what the agent does at start for its tunnel (import the module,
# load the PSK, build the node: key created, then loaded again on a restart), then one
# handshake, which must be what brings cryptography in.
AGENT_START = """
import sys, tempfile
def crypto():
    return sorted(m for m in sys.modules if m == "cryptography" or m.startswith("cryptography."))
from edgemesh.runtime import patching
patching.patch_all()
from edgemesh.tunnel import module, identity
from edgemesh.tunnel.node import TunnelNode
state = tempfile.mkdtemp()
psk = identity.psk_from_bytes(b"a cluster secret of some length")
a = TunnelNode("node-a", "agent", state, psk, "peers.json")
again = TunnelNode("node-a", "agent", state, psk, "peers.json")
assert a.public_key == again.public_key and len(a.public_key) == 32
assert crypto() == [], crypto()
from edgemesh.tunnel.handshake import Handshake, Hello
b = identity.load_or_create_key(tempfile.mkdtemp())
i, r = Handshake(True, a.static, psk, Hello("node-a")), Handshake(False, b, psk, Hello("node-b"))
for step in range(3):
    w, rd = (i, r) if step % 2 == 0 else (r, i)
    rd.read_message(w.write_message())
assert r.result.remote_static == a.public_key and i.result.remote_static == b.public
assert "cryptography.hazmat.bindings._rust" in crypto(), crypto()
print("ok")
"""


def test_agent_start_imports_no_cryptography_until_a_handshake() -> None:
    r = subprocess.run([sys.executable, "-c", AGENT_START], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
