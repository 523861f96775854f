"""Sans-IO Noise ``XXpsk0_25519_ChaChaPoly_SHA256`` handshake and the transport cipher after it.

The pattern (see docs/tunnel-protocol.md for why this one)::

    -> psk, e                      payload: empty (authenticated with the PSK)
    <- e, ee, s, es                payload: responder's Hello (JSON)
    -> s, se                       payload: initiator's Hello (JSON)

With the PSK mixed in first, a party without it cannot produce or read even message 1, so a
non-member learns nothing (not our static key, not our node name). Both static keys are
authenticated by the DH tokens; ``Split`` gives two one-way transport keys (forward secrecy:
they depend on the ephemeral keys only held in memory).

Nothing here does I/O: ``write_message()`` returns bytes to send, ``read_message(data)``
consumes one received handshake message. Messages are framed on the wire by the caller
(a 2-byte big-endian length, like every record, see ``records``).

``cryptography`` (DH and AEAD) is imported by ``primitives()`` on the first handshake message
or cipher, not with this module: an agent without peers never loads it (~7.7 MB of RSS).
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgemesh.errors import LocalProtocolError, RemoteProtocolError
from edgemesh.tunnel.x25519 import StaticKey

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

PROTOCOL_NAME = b"Noise_XXpsk0_25519_ChaChaPoly_SHA256"
PROLOGUE = b"edgemesh-tunnel/1"
DHLEN = 32
TAGLEN = 16
MAX_MESSAGE = 65535
MAX_HELLO = 4096
NONCE_LIMIT = 2**63  # far below 2^64-1; a session is closed long before
CHACHA = "chachapoly"
AESGCM_NAME = "aesgcm"


def _cpu_has_aes() -> bool:
    """True when the CPU advertises AES instructions (x86 ``aes``, ARM ``aes`` feature)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return "aes" in line.split(":", 1)[-1].split()
    except OSError:
        pass
    return False


# transport AEADs this host runs fast, preferred first (docs/tunnel-protocol.md §3)
LOCAL_AEADS: tuple[str, ...] = (AESGCM_NAME, CHACHA) if _cpu_has_aes() else (CHACHA,)


class HandshakeFailed(RemoteProtocolError):
    """The peer's handshake bytes did not verify (wrong PSK, tampering, garbage)."""


@dataclass(frozen=True)
class Primitives:
    """What the handshake and the transport ciphers use from ``cryptography``."""
    generate_key: Callable[[], X25519PrivateKey]
    load_public_key: Callable[[bytes], X25519PublicKey]
    aesgcm: type[AESGCM]
    chacha: type[ChaCha20Poly1305]
    invalid_tag: type[Exception]


@functools.cache
def primitives() -> Primitives:
    """``cryptography``'s DH and AEAD classes, imported on first use (then cached)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    return Primitives(X25519PrivateKey.generate, X25519PublicKey.from_public_bytes, AESGCM,
                      ChaCha20Poly1305, InvalidTag)


def public_bytes(key: StaticKey | X25519PrivateKey | X25519PublicKey) -> bytes:
    """The raw 32-byte public key of ``key`` (no ``cryptography`` import for a StaticKey)."""
    if isinstance(key, StaticKey):
        return key.public
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    # public_bytes_raw(): same bytes as public_bytes(Raw, Raw) without importing
    # cryptography's serialization package (ssh, rsa, dsa, ec...: ~1 MB RSS idle)
    return pub.public_bytes_raw()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def hkdf(chaining_key: bytes, ikm: bytes, n: int) -> list[bytes]:
    """Noise's HKDF: 2 or 3 outputs of 32 bytes."""
    temp = _hmac(chaining_key, ikm)
    outs: list[bytes] = []
    prev = b""
    for i in range(1, n + 1):
        prev = _hmac(temp, prev + bytes([i]))
        outs.append(prev)
    return outs


def _nonce(n: int) -> bytes:
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")


def _nonce_be(n: int) -> bytes:
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "big")  # Noise's AESGCM nonce


def transport_aead(local: Hello, remote: Hello) -> str:
    """AES-GCM when both sides list it (both have AES instructions), else ChaCha20-Poly1305."""
    return AESGCM_NAME if AESGCM_NAME in local.aead and AESGCM_NAME in remote.aead else CHACHA


class CipherState:
    """A key and a counter nonce; without a key it passes plaintext through (Noise §5.1)."""

    def __init__(self, key: bytes | None = None, aead: str = CHACHA) -> None:
        self._aead: ChaCha20Poly1305 | AESGCM | None = None
        self._nonce = _nonce_be if aead == AESGCM_NAME else _nonce
        if key is not None:
            p = primitives()
            self._aead = p.aesgcm(key) if aead == AESGCM_NAME else p.chacha(key)
        self.key = key
        self.aead = aead
        self.n = 0

    def encrypt(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        if self.n >= NONCE_LIMIT:
            raise LocalProtocolError("nonce space exhausted; the session must be re-established")
        out = self._aead.encrypt(self._nonce(self.n), plaintext, ad)
        self.n += 1
        return out

    def encrypt_into(self, plaintext: bytes | memoryview, out: memoryview) -> None:
        """Encrypt (no associated data) into ``out`` (len(plaintext) + 16; may alias it)."""
        if self._aead is None or self.n >= NONCE_LIMIT:
            raise LocalProtocolError("no transport key, or nonce space exhausted")
        self._aead.encrypt_into(self._nonce(self.n), plaintext, None, out)
        self.n += 1

    def with_aead(self, aead: str) -> "CipherState":
        """The same key and counter under another AEAD (the negotiated transport cipher)."""
        state = CipherState(self.key, aead)
        state.n = self.n
        return state

    def decrypt(self, ad: bytes, ciphertext: bytes | memoryview) -> bytes:
        if self._aead is None:
            return bytes(ciphertext)  # no key yet (handshake): a copy, never the hot path
        if self.n >= NONCE_LIMIT:
            raise RemoteProtocolError("nonce space exhausted")
        try:
            out = self._aead.decrypt(self._nonce(self.n), ciphertext, ad)
        except primitives().invalid_tag:  # evaluated only when decrypt raised
            raise HandshakeFailed("authentication tag mismatch") from None
        self.n += 1
        return out


class SymmetricState:
    def __init__(self) -> None:
        self.h = hashlib.sha256(PROTOCOL_NAME).digest() if len(PROTOCOL_NAME) > 32 \
            else PROTOCOL_NAME.ljust(32, b"\x00")
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = hkdf(self.ck, ikm, 2)
        self.cipher = CipherState(temp_k)

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cipher = CipherState(temp_k)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ct = self.cipher.encrypt(self.h, plaintext)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        pt = self.cipher.decrypt(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = hkdf(self.ck, b"", 2)
        return CipherState(k1), CipherState(k2)


@dataclass(frozen=True)
class Hello:
    """What each side says about itself inside the handshake (encrypted, authenticated)."""
    node: str
    role: str = "agent"          # agent | server
    intent: str = "session"      # session | circuit (initiator only)
    window: int = 4 * 1024 * 1024  # initial per-stream receive window we grant
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    aead: tuple[str, ...] = LOCAL_AEADS  # transport ciphers we offer, preferred first

    def encode(self) -> bytes:
        doc = {"v": 1, "node": self.node, "role": self.role, "intent": self.intent,
               "window": self.window, "aead": list(self.aead), **self.extra}
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> "Hello":
        if len(data) > MAX_HELLO:
            raise RemoteProtocolError("hello too large")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise RemoteProtocolError("hello is not JSON") from None
        if not isinstance(doc, dict) or doc.get("v") != 1:
            raise RemoteProtocolError("hello: unsupported version")
        node, role, intent = doc.get("node"), doc.get("role", "agent"), doc.get("intent",
                                                                                "session")
        window = doc.get("window", 4 * 1024 * 1024)
        if not isinstance(node, str) or not 0 < len(node) <= 253:
            raise RemoteProtocolError("hello: bad node name")
        if role not in ("agent", "server") or intent not in ("session", "circuit"):
            raise RemoteProtocolError("hello: bad role or intent")
        if not isinstance(window, int) or not 65536 <= window <= 64 * 1024 * 1024:
            raise RemoteProtocolError("hello: window out of range")
        aead = doc.get("aead", [CHACHA])
        if not isinstance(aead, list) or len(aead) > 8:
            raise RemoteProtocolError("hello: bad aead list")
        extra = {k: v for k, v in doc.items()
                 if k not in ("v", "node", "role", "intent", "window", "aead")}
        return cls(node=node, role=role, intent=intent, window=window, extra=extra,
                   aead=tuple(str(a) for a in aead))


@dataclass
class Result:
    """A finished handshake: the peer's proven static key and Hello, and the two ciphers."""
    remote_static: bytes
    remote_hello: Hello
    send: CipherState
    recv: CipherState
    handshake_hash: bytes


class Handshake:
    """One side of XXpsk0. Drive it: initiator writes 1, reads 2, writes 3; responder mirrors.

    ``next_is_write`` says whose turn it is; ``result`` is set once the handshake completed.
    """

    def __init__(self, initiator: bool, static: StaticKey | X25519PrivateKey, psk: bytes,
                 hello: Hello, ephemeral: X25519PrivateKey | None = None) -> None:
        if len(psk) != 32:
            raise LocalProtocolError("the PSK must be 32 bytes")
        self.initiator = initiator
        self._s = static if isinstance(static, StaticKey) else StaticKey.from_cryptography(static)
        self._e = ephemeral
        self._psk = psk
        self._hello = hello
        self._re: X25519PublicKey | None = None
        self._rs: X25519PublicKey | None = None
        self._remote_hello: Hello | None = None
        self._ss = SymmetricState()
        self._ss.mix_hash(PROLOGUE)
        self._step = 0
        self.result: Result | None = None

    @property
    def next_is_write(self) -> bool:
        return (self._step % 2 == 0) == self.initiator

    @property
    def done(self) -> bool:
        return self.result is not None

    def write_message(self) -> bytes:
        if not self.next_is_write or self.done:
            raise LocalProtocolError("not our turn to write")
        ss, out = self._ss, bytearray()
        if self._step == 0:
            ss.mix_key_and_hash(self._psk)
            out += self._write_e()
            out += ss.encrypt_and_hash(b"")
        elif self._step == 1:
            out += self._write_e()
            ss.mix_key(self._dh(self._e, self._re))
            out += ss.encrypt_and_hash(self._s.public)
            ss.mix_key(self._dh(self._s.dh_key(), self._re))
            out += ss.encrypt_and_hash(self._hello.encode())
        else:
            out += ss.encrypt_and_hash(self._s.public)
            ss.mix_key(self._dh(self._s.dh_key(), self._re))
            out += ss.encrypt_and_hash(self._hello.encode())
            self._finish()
        self._step += 1
        if len(out) > MAX_MESSAGE:
            raise LocalProtocolError("handshake message too large")
        return bytes(out)

    def read_message(self, data: bytes) -> None:
        if self.next_is_write or self.done:
            raise LocalProtocolError("not our turn to read")
        ss = self._ss
        if self._step == 0:
            ss.mix_key_and_hash(self._psk)
            rest = self._read_e(data)
            if ss.decrypt_and_hash(rest) != b"":
                raise HandshakeFailed("message 1 must have an empty payload")
        elif self._step == 1:
            rest = self._read_e(data)
            ss.mix_key(self._dh(self._e, self._re))
            rest = self._read_s(rest)
            ss.mix_key(self._dh(self._e, self._rs))
            self._remote_hello = Hello.decode(ss.decrypt_and_hash(rest))
        else:
            rest = self._read_s(data)
            ss.mix_key(self._dh(self._e, self._rs))
            self._remote_hello = Hello.decode(ss.decrypt_and_hash(rest))
            self._finish()
        self._step += 1

    # ---- tokens -------------------------------------------------------------------------------

    def _write_e(self) -> bytes:
        if self._e is None:
            self._e = primitives().generate_key()
        pub = public_bytes(self._e)
        self._ss.mix_hash(pub)
        self._ss.mix_key(pub)  # psk handshakes mix e into the key too (Noise §9.2)
        return pub

    def _read_e(self, data: bytes) -> bytes:
        if len(data) < DHLEN:
            raise HandshakeFailed("handshake message too short")
        pub = data[:DHLEN]
        self._re = primitives().load_public_key(pub)
        self._ss.mix_hash(pub)
        self._ss.mix_key(pub)
        return data[DHLEN:]

    def _read_s(self, data: bytes) -> bytes:
        n = DHLEN + TAGLEN
        if len(data) < n:
            raise HandshakeFailed("handshake message too short")
        self._rs = primitives().load_public_key(self._ss.decrypt_and_hash(data[:n]))
        return data[n:]

    @staticmethod
    def _dh(priv: X25519PrivateKey | None, pub: X25519PublicKey | None) -> bytes:
        if priv is None or pub is None:
            raise LocalProtocolError("handshake state incomplete")
        try:
            return priv.exchange(pub)
        except ValueError:  # an all-zero shared secret: a small-order point
            raise HandshakeFailed("invalid public key") from None

    def _finish(self) -> None:
        c1, c2 = self._ss.split()
        send, recv = (c1, c2) if self.initiator else (c2, c1)
        assert self._rs is not None and self._remote_hello is not None
        aead = transport_aead(self._hello, self._remote_hello)
        send, recv = send.with_aead(aead), recv.with_aead(aead)
        self.result = Result(remote_static=public_bytes(self._rs),
                             remote_hello=self._remote_hello, send=send, recv=recv,
                             handshake_hash=self._ss.h)
