"""The node's static X25519 key, usable without loading ``cryptography`` until a handshake.

An idle agent (no peers yet) never runs a Diffie-Hellman, yet it must know its own public key
from the start: it is published with the node's addresses and shown by ``edgemesh status``.
``cryptography``'s Rust extension costs ~7.7 MB of RSS once imported, so the public key is
derived here with a small pure-Python X25519 (RFC 7748 §5: clamping, the Montgomery ladder).
It runs only when a key is loaded or created (once per process, about a millisecond); the
handshakes' DH and AEAD use ``cryptography``, imported the first time a ``StaticKey`` or the
handshake needs it (``handshake.primitives()``).

The ladder here is not constant-time (Python integers are not). That is acceptable only
because it runs once per process on our own key, before any peer can talk to us; never use
it for a DH with a peer's bytes.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEYLEN = 32
P = 2**255 - 19
A24 = 121665  # (486662 - 2) / 4, RFC 7748 §5
BASE_POINT = (9).to_bytes(KEYLEN, "little")


def clamp(scalar: bytes) -> int:
    """RFC 7748 decodeScalar25519: the scalar as an integer with its bits set and cleared."""
    if len(scalar) != KEYLEN:
        raise ValueError("an X25519 scalar is 32 bytes")
    k = bytearray(scalar)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    return int.from_bytes(k, "little")


def _decode_u(u: bytes) -> int:
    if len(u) != KEYLEN:
        raise ValueError("an X25519 u-coordinate is 32 bytes")
    return (int.from_bytes(u, "little") & ((1 << 255) - 1)) % P  # top bit masked (§5)


def x25519(scalar: bytes, u: bytes) -> bytes:
    """X25519(k, u) of RFC 7748 §5 (not constant-time: see the module docstring)."""
    k, x1 = clamp(scalar), _decode_u(u)
    x2, z2, x3, z3 = 1, 0, x1, 1
    swap = 0
    for t in range(254, -1, -1):
        bit = (k >> t) & 1
        if swap ^ bit:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = x2 + z2, x2 - z2
        aa, bb = a * a % P, b * b % P
        e = aa - bb
        c, d = x3 + z3, x3 - z3
        da, cb = d * a % P, c * b % P
        x3, z3 = (da + cb) ** 2 % P, x1 * (da - cb) ** 2 % P
        x2, z2 = aa * bb % P, e * (aa + A24 * e) % P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, P - 2, P) % P).to_bytes(KEYLEN, "little")


def public_key(private: bytes) -> bytes:
    """The X25519 public key (32 bytes) of a 32-byte private key."""
    return x25519(private, BASE_POINT)


class StaticKey:
    """A long-lived key pair: raw ``private`` and ``public`` bytes, DH through ``cryptography``.

    ``cryptography``'s key object is made on the first ``dh_key()`` (the first handshake), so
    holding a StaticKey costs no more than its 64 bytes.
    """

    __slots__ = ("private", "public", "_dh_key")

    def __init__(self, private: bytes) -> None:
        self.private = bytes(private)
        self.public = public_key(self.private)
        self._dh_key: X25519PrivateKey | None = None

    @classmethod
    def generate(cls) -> StaticKey:
        """A new random key (any 32 random bytes are a valid X25519 private key)."""
        return cls(os.urandom(KEYLEN))

    @classmethod
    def from_cryptography(cls, key: X25519PrivateKey) -> StaticKey:
        """Wrap a ``cryptography`` key (tests and tools that already hold one)."""
        static = cls.__new__(cls)
        static.private = key.private_bytes_raw()
        static.public = key.public_key().public_bytes_raw()
        static._dh_key = key
        return static

    def dh_key(self) -> X25519PrivateKey:
        """The same key as a ``cryptography`` object, for the handshake's DH (made once)."""
        if self._dh_key is None:
            from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

            self._dh_key = X25519PrivateKey.from_private_bytes(self.private)
        return self._dh_key

    def __repr__(self) -> str:
        return f"StaticKey(public={self.public.hex()[:16]}...)"  # never the private half
