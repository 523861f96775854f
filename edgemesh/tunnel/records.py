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


SMALL_BUFFER = 16 * 1024  # the least a reader borrows for a small read


class RecordReader:
    """Feed bytes with ``feed`` (or receive straight into ``space()`` and ``commit``); take
    whole record bodies with ``next_record`` / ``next_view`` (None: need more).

    The buffer has a fixed size (``capacity`` plus one largest record), so a reader never holds
    more than that, whatever the peer sends; ``release`` gives it up while nothing is pending
    (an idle connection then holds no buffer).
    """

    def __init__(self, capacity: int = 256 * 1024) -> None:
        self._size = capacity + 2 + MAX_RECORD
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    @property
    def holding(self) -> bool:
        """Whether a buffer is allocated."""
        return bool(self._buf)

    def release(self) -> None:
        """Drop the buffer when no partial record is in it (it comes back on ``space()``)."""
        if self._start == self._end and self._buf:
            self._buf = bytearray()
            self._view = memoryview(self._buf)
            self._start = self._end = 0

    def feed(self, data: bytes | memoryview) -> None:
        n = len(data)
        while n:
            space = self.space()
            if not space:
                raise ValueError("record reader overfed")  # callers read what space() allows
            k = min(n, len(space))
            space[:k] = data[len(data) - n:len(data) - n + k]
            self.commit(k)
            n -= k

    def space(self, hint: int = 0) -> memoryview:
        """Free room at the end of the buffer for a ``recv_into`` (compacts first if needed).

        ``hint`` (bytes known to be waiting, e.g. ``FIONREAD``) sizes a buffer taken afresh:
        a small message borrows a small buffer instead of the whole ``capacity`` (zeroing it
        cost more than the rest of a small request); it grows to full size as soon as a
        record needs more room than it has."""
        if not self._buf:
            size = min(self._size, max(hint, SMALL_BUFFER)) if hint else self._size
            self._buf = bytearray(size)
            self._view = memoryview(self._buf)
        if self._start and (self._start == self._end or len(self._buf) - self._end < MAX_RECORD):
            k = self._end - self._start
            self._buf[:k] = self._view[self._start:self._end]
            self._start, self._end = 0, k
        if len(self._buf) < self._size and len(self._buf) - self._end < self.wanted():
            grown = bytearray(self._size)
            grown[:self._end - self._start] = self._view[self._start:self._end]
            self._buf, self._view = grown, memoryview(grown)
            self._start, self._end = 0, self._end - self._start
        return self._view[self._end:]

    def commit(self, n: int) -> None:
        """``n`` bytes were written at the start of ``space()``."""
        self._end += n

    def next_view(self) -> memoryview | None:
        """The next whole record body as a view into the buffer, valid until the next
        ``space()``/``feed``; None when more bytes are needed."""
        avail = self._end - self._start
        if avail < 2:
            return None
        (n,) = _LEN.unpack_from(self._buf, self._start)
        if avail < 2 + n:
            return None
        start = self._start + 2
        self._start = start + n
        return self._view[start:start + n]

    def next_record(self) -> bytes | None:
        view = self.next_view()
        return None if view is None else bytes(view)

    def wanted(self) -> int:
        """Bytes still missing for the record being read (at least 1): a read-size hint."""
        avail = self._end - self._start
        if avail < 2:
            return 2 - avail
        n: int = _LEN.unpack_from(self._buf, self._start)[0]
        return max(1, 2 + n - avail)

    def leftover(self) -> bytes:
        """Bytes fed but not yet consumed as records (handed on when a relay starts splicing)."""
        return bytes(self._view[self._start:self._end])


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

    def seal_in_place(self, record: memoryview) -> None:
        """``record`` is ``2 length bytes | plaintext | 16 spare bytes``: write the length and
        encrypt the plaintext over itself, so the whole view is then one wire record."""
        n = len(record) - 2
        if not TAGLEN <= n <= MAX_RECORD:
            raise ValueError("record size out of range")
        _LEN.pack_into(record, 0, n)
        self._send.encrypt_into(record[2:2 + n - TAGLEN], record[2:])

    def open(self, body: bytes | memoryview) -> bytes:
        """Decrypt one record body; a bad tag is the peer's fault (RemoteProtocolError)."""
        if len(body) < TAGLEN:
            raise RemoteProtocolError("record shorter than its tag")
        return self._recv.decrypt(b"", body)
