"""Many datagrams per system call: ``recvmmsg``/``sendmmsg`` through ctypes (Linux, glibc, musl).

Python's socket module has neither call. At DNS rates the kernel's per-call cost and Python's
per-datagram objects (a 4 KiB buffer, an address tuple built with ``inet_ntop`` and parsed back
by ``sendto``) are most of what a cached answer costs, so the UDP loop reads up to ``VLEN``
queries into fixed buffers with one call and sends their answers with another. Addresses stay
raw ``sockaddr`` bytes; they become tuples only on the slow path (``address``).

The calls never block (``MSG_DONTWAIT``, non-blocking socket), so they run with the GIL held
(``PyDLL``): no GIL release and re-acquire per batch.
"""
from __future__ import annotations

import ctypes
import errno
import socket
import struct
from typing import Any

VLEN = 64  # datagrams per call
MSG_DONTWAIT = 0x40
NAME_SIZE = 28  # sockaddr_in6, the larger of the two


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint32)]


def _libc() -> Any:
    libc = ctypes.PyDLL(None, use_errno=True)
    recv, send = libc.recvmmsg, libc.sendmmsg
    recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    recv.restype = send.restype = ctypes.c_int
    return recv, send


class Batches:
    """Fixed slots for one UDP socket: ``vlen`` datagrams of up to ``size`` bytes.

    After ``receive()`` returned n, datagram j is ``data[j * size : j * size + lengths(n)[j]]``
    and came from the sockaddr at ``names[j * NAME_SIZE:]``. An answer is written over its
    query in the same slot (the two-byte ID is already there) and queued as send slot k with
    ``reply_to(k, j, length)``, or with ``iov_len[2 * k + 1] = length`` when k == j (send slot
    k points at receive slot k until ``reply_to`` moves it). ``send(k)`` sends slots 0..k-1.
    """

    def __init__(self, fd: int, family: int, size: int, vlen: int = VLEN) -> None:
        self._recvmmsg, self._sendmmsg = _libc()
        self.fd, self.size, self.vlen = fd, size, vlen
        self.v4 = family == socket.AF_INET
        namelen = 16 if self.v4 else 28
        self._buf = ctypes.create_string_buffer(vlen * size)
        self._names = ctypes.create_string_buffer(vlen * NAME_SIZE)
        self._riov, self._siov = (_IOVec * vlen)(), (_IOVec * vlen)()
        self._rhdr, self._shdr = (_MMsgHdr * vlen)(), (_MMsgHdr * vlen)()
        self._base, self._nbase = ctypes.addressof(self._buf), ctypes.addressof(self._names)
        for i in range(vlen):
            self._riov[i].iov_base = self._siov[i].iov_base = self._base + i * size
            self._riov[i].iov_len = size
            for hdr, iov in ((self._rhdr[i].msg_hdr, self._riov), (self._shdr[i].msg_hdr,
                                                                    self._siov)):
                hdr.msg_name = self._nbase + i * NAME_SIZE
                hdr.msg_namelen = namelen
                hdr.msg_iov = ctypes.addressof(iov) + i * ctypes.sizeof(_IOVec)
                hdr.msg_iovlen = 1
        self._rhdr_at, self._shdr_at = ctypes.addressof(self._rhdr), ctypes.addressof(self._shdr)
        hsize = ctypes.sizeof(_MMsgHdr)
        self._hsize = hsize
        # views for per-datagram access without ctypes objects
        self.data = memoryview(self._buf).cast("B")
        self.names = memoryview(self._names).cast("B")
        self.ipv4 = self.names.cast("I")  # index j * 7 + 1: sin_addr of slot j
        self._lens = memoryview(self._rhdr).cast("B").cast("I")
        self._len_at, self._len_step = _MMsgHdr.msg_len.offset // 4, hsize // 4
        ptr = struct.calcsize("P")
        self._sptr = memoryview(self._shdr).cast("B").cast("P")
        self._name_at, self._ptr_step = _MsgHdr.msg_name.offset // ptr, hsize // ptr
        # base, len, base, len, ... (size_t and pointers have one size on Linux ABIs)
        self.iov_len = self._iov_base = memoryview(self._siov).cast("B").cast("P")
        self._moved = False

    def receive(self) -> int:
        """Datagrams now in the slots (0: none waiting); OSError other than EAGAIN raised."""
        n = self._recvmmsg(self.fd, self._rhdr_at, self.vlen, MSG_DONTWAIT, None)
        if n >= 0:
            return int(n)
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EWOULDBLOCK):
            return 0
        raise OSError(err, "recvmmsg")

    def lengths(self, n: int) -> list[int]:
        """The lengths of the ``n`` datagrams of the last ``receive``."""
        lens, at, step = self._lens, self._len_at, self._len_step
        return [lens[at + j * step] for j in range(n)]

    def reply_to(self, k: int, j: int, length: int) -> None:
        """Send slot ``k``: ``length`` bytes of slot ``j`` to the sender of datagram ``j``."""
        self._sptr[self._name_at + k * self._ptr_step] = self._nbase + j * NAME_SIZE
        self._iov_base[k * 2] = self._base + j * self.size
        self.iov_len[k * 2 + 1] = length
        self._moved = True

    def _restore(self, count: int) -> None:
        """Point send slots 0..count-1 back at receive slots 0..count-1."""
        for k in range(count):
            self._sptr[self._name_at + k * self._ptr_step] = self._nbase + k * NAME_SIZE
            self._iov_base[k * 2] = self._base + k * self.size
        self._moved = False

    def send(self, count: int) -> int:
        """Send slots 0..count-1; a slot the kernel refuses is skipped. Returns how many left."""
        sent = done = 0
        while done < count:
            r = self._sendmmsg(self.fd, self._shdr_at + done * self._hsize, count - done, 0)
            if r > 0:
                sent += r
                done += r
            else:
                done += 1  # this answer cannot go (e.g. an unreachable address): drop it
        if self._moved:
            self._restore(count)
        return sent

    def address(self, j: int) -> tuple[Any, ...]:
        """The sender of datagram ``j`` as the socket module spells it (the slow path)."""
        raw = self.names[j * NAME_SIZE:(j + 1) * NAME_SIZE].tobytes()
        port = struct.unpack_from("!H", raw, 2)[0]
        if self.v4:
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
        flow, scope = struct.unpack_from("!I", raw, 4)[0], struct.unpack_from("=I", raw, 24)[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flow, scope

    def client_key(self, j: int) -> int | bytes:  # (the UDP loop inlines the IPv4 case)
        """A hashable identity of the sender's address of datagram ``j`` (not its port)."""
        if self.v4:
            return self.ipv4[j * 7 + 1]
        at = j * NAME_SIZE
        return self.names[at + 8:at + 28].tobytes()  # address and scope


def available() -> bool:
    """Whether this libc has ``recvmmsg``/``sendmmsg`` (else the server reads one at a time)."""
    try:
        _libc()
    except (OSError, AttributeError):
        return False
    return True
