"""Sans-IO record layer: ``u16 length | body`` on the wire, bodies encrypted after the handshake.

Every byte a tunnel connection carries is a record: the three handshake messages, then one
encrypted frame per record (``SecureChannel``). The reader is bounded by construction (a record
is at most 65535 bytes) and never holds more than one partial record plus what it was fed.
"""
from __future__ import annotations

import struct

from edgemesh.errors import RemoteProtocolError
from edgemesh.tunnel.handshake import TAGLEN, CipherState

MAX_RECORD = 65535
_LEN = struct.Struct(">H")


def frame_record(body: bytes) -> bytes:
    """``body`` with its length prefix."""
    if len(body) > MAX_RECORD:
        raise ValueError("record too large")
    return _LEN.pack(len(body)) + body


class RecordReader:
    """Feed bytes with ``feed``; take whole record bodies with ``next_record`` (None: need more)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next_record(self) -> bytes | None:
        avail = len(self._buf) - self._pos
        if avail < 2:
            return None
        (n,) = _LEN.unpack_from(self._buf, self._pos)
        if avail < 2 + n:
            return None
        start = self._pos + 2
        body = bytes(self._buf[start:start + n])
        self._pos = start + n
        return body

    def wanted(self) -> int:
        """Bytes still missing for the record being read (at least 1): a read-size hint."""
        avail = len(self._buf) - self._pos
        if avail < 2:
            return 2 - avail
        (n,) = _LEN.unpack_from(self._buf, self._pos)
        return max(1, 2 + n - avail)

    def leftover(self) -> bytes:
        """Bytes fed but not yet consumed as records (handed on when a relay starts splicing)."""
        return bytes(self._buf[self._pos:])


class SecureChannel:
    """Encrypts outgoing record bodies and decrypts incoming ones with the transport keys."""

    MAX_PLAINTEXT = MAX_RECORD - TAGLEN

    def __init__(self, send: CipherState, recv: CipherState) -> None:
        self._send = send
        self._recv = recv

    def seal(self, plaintext: bytes) -> bytes:
        """One wire record holding ``plaintext`` encrypted."""
        if len(plaintext) > self.MAX_PLAINTEXT:
            raise ValueError("plaintext too large for one record")
        return frame_record(self._send.encrypt(b"", plaintext))

    def open(self, body: bytes) -> bytes:
        """Decrypt one record body; a bad tag is the peer's fault (RemoteProtocolError)."""
        if len(body) < TAGLEN:
            raise RemoteProtocolError("record shorter than its tag")
        return self._recv.decrypt(b"", body)
