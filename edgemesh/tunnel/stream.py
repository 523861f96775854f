"""One multiplexed stream of a tunnel session: its receive queue, flow-control waits and the
blocking ``send``/``recv``/pump API that greenlets use.

The session's reader feeds it through the ``on_*`` methods; for a stream pumped to a socket
(``drain_to``) the bytes a read brought are sent to that socket by the reader itself with one
non-blocking ``sendmsg`` (``flush_batch``), and only what the socket did not take is queued.
Sending goes through the session, which seals and queues records (``Session.seal_data``). What
a stream needs of its session is ``StreamHost``: the contract between the two, in one place.
"""
from __future__ import annotations

import collections
import fcntl
import itertools
import socket
import struct
import termios
from collections.abc import Callable
from typing import Protocol, cast

import gevent.event
from gevent.socket import wait_read

from edgemesh.errors import UnavailableError
from edgemesh.tunnel import frames as fr

PING_INTERVAL = 10.0
DEAD_AFTER = 3 * PING_INTERVAL + 5  # a silent session is closed then: no wait outlives it
PUMP_RECORDS = 16             # records a pump reads from its socket with one recvmsg_into
SEND_CHUNKS = 64              # queued chunks drain_to sends with one sendmsg
RECORD_OVERHEAD = 2 + fr.HEADER_LEN + 16  # length prefix, frame header, AEAD tag


def readable_bytes(fd: int) -> int:
    """Bytes waiting in a socket's receive queue (0 at EOF, or when unknown: closed, not a
    socket)."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return 0


class StreamClosed(UnavailableError):
    """The stream was reset by the peer, or its session ended."""

    def __init__(self, message: str, code: int = fr.ResetCode.CANCEL) -> None:
        super().__init__(message)
        self.code = code


class StreamHost(Protocol):
    """What a ``Stream`` uses of its session (``session.Session`` provides it)."""
    peer: str
    closed: bool
    mux: fr.Mux
    streams: dict[int, "Stream"]
    touched: list["Stream"]  # streams holding a batch for their sink: flushed after a read
    buffered: int  # bytes received and not yet taken by any stream's reader (back-pressure)

    @property
    def queued(self) -> int: ...  # sealed bytes not yet sent (0: all handed to flush sent)

    def write(self, *frames: fr.Frame) -> None: ...

    def write_data(self, sid: int, data: memoryview, fin: bool = False) -> None: ...

    def seal_data(self, sid: int, record: memoryview, fin: bool = False) -> None: ...

    def flush(self) -> None: ...

    def wait_writable(self) -> None: ...

    def unbuffer(self, n: int) -> None: ...

    def forget_if_done(self, sid: int) -> None: ...


class Stream:
    """One multiplexed stream: blocking ``send``/``recv`` for greenlets, flow-controlled."""

    def __init__(self, session: StreamHost, sid: int, target: fr.Target) -> None:
        self.session = session
        self.id = sid
        self.target = target
        self._chunks: collections.deque[bytes | memoryview] = collections.deque()
        self._readable = gevent.event.Event()
        self._writable = gevent.event.Event()
        self._accepted = gevent.event.Event()
        self.sink: socket.socket | None = None  # drain_to's socket: the reader sends to it
        self._batch: list[bytes | memoryview] = []  # for the sink, sent after a read's records
        self._queued = 0  # bytes in _chunks
        # called with (bytes from the sink's socket, bytes to it) as they move: an attached
        # proxy connection's idle clock and byte counters
        self.on_bytes: Callable[[int, int], None] | None = None
        self.eof = False
        self.error: StreamClosed | None = None

    # called by the session's reader --------------------------------------------------------------
    def on_data(self, data: bytes | memoryview) -> None:
        if self.sink is not None and not self._chunks:
            if not self._batch:
                self.session.touched.append(self)
            self._batch.append(data)
            self.session.buffered += len(data)
            return
        self._queue(data)

    def _queue(self, data: bytes | memoryview) -> None:
        self._queued += len(data)
        self._chunks.append(data)
        self.session.buffered += len(data)
        self._readable.set()

    def flush_batch(self) -> None:
        """Send what this read brought for the sink with one non-blocking sendmsg; queue
        the rest for ``drain_to``."""
        batch, self._batch = self._batch, []
        if not batch:
            return
        total = sum(len(b) for b in batch)
        self.session.unbuffer(total)
        sent = 0
        if self.sink is not None and not self._chunks:
            try:
                sent = self.sink.sendmsg(batch, (), socket.MSG_DONTWAIT)
            except OSError:
                sent = 0  # full (EAGAIN), or broken: drain_to meets the error and resets
        if sent:
            self._delivered(sent, total - sent + self._queued)
            if self.on_bytes is not None:
                self.on_bytes(0, sent)
        for data in batch:
            if sent >= len(data):
                sent -= len(data)
                continue
            self._queue(data[sent:] if sent else data)
            sent = 0

    def on_window(self) -> None:
        """The peer granted send window."""
        self._writable.set()

    def on_accepted(self) -> None:
        self._accepted.set()
        self._writable.set()

    def on_end(self) -> None:
        """The peer's FIN."""
        self.flush_batch()
        self.eof = True
        self._readable.set()

    def on_reset(self, error: StreamClosed) -> None:
        """Reset by the peer, or the session ended: every wait ends with ``error``."""
        self.flush_batch()
        self.error = error
        self.session.unbuffer(self._queued)
        self._queued = 0
        self._chunks.clear()
        for event in (self._readable, self._writable, self._accepted):
            event.set()

    def _delivered(self, n: int, backlog: int) -> None:
        grant = self.session.mux.consumed(self.id, n, backlog)
        if grant is not None:
            self.session.write(grant)

    def _sent(self, n: int) -> None:
        """The first ``n`` queued bytes were sent."""
        while n:
            head = self._chunks[0]
            if n < len(head):
                self._chunks[0] = memoryview(head)[n:]
                self.session.unbuffer(n)
                self._queued -= n
                self._delivered(n, self._queued)
                return
            self._pop()
            n -= len(head)

    def _pop(self) -> bytes | memoryview:
        data = self._chunks.popleft()
        self.session.unbuffer(len(data))
        self._queued -= len(data)
        self._delivered(len(data), self._queued)
        return data

    # the application's side ---------------------------------------------------------------------
    def wait_accepted(self, timeout: float | None) -> None:
        if not self._accepted.wait(timeout):
            self.reset()
            raise UnavailableError(f"stream to {self.session.peer} not accepted in time")
        if self.error:
            raise self.error

    def _room(self) -> int:
        """Send window now, waiting (up to the keepalive timeout) while it is closed."""
        mux = self.session.mux
        while True:
            if self.error:
                raise self.error
            if self.id not in mux.streams:
                raise StreamClosed("stream closed")
            n = mux.send_room(self.id)
            if n:
                return n
            self._writable.clear()
            if mux.send_room(self.id) == 0:
                self._writable.wait(timeout=DEAD_AFTER)

    def send(self, data: bytes | memoryview, fin: bool = False) -> None:
        """Send all of ``data`` (waiting for window as needed); ``fin`` half-closes after it."""
        view = memoryview(data)
        while view:
            n = min(len(view), self._room())
            self.session.write_data(self.id, view[:n], fin and n == len(view))
            view = view[n:]
        if fin and not data:
            self.shutdown_write()
        self.session.forget_if_done(self.id)

    def send_from(self, sock: socket.socket) -> None:
        """Pump ``sock`` into the stream until EOF (then FIN): the bulk path. Each read lands
        in the payload room of up to PUMP_RECORDS records, which are then sealed in place;
        they are allocated once ``sock`` is readable, sized to what it holds (``FIONREAD``: a
        small message costs a small buffer, not PUMP_RECORDS full records), and live until
        the writer sent them; full-size ones are reused while the writer keeps up (zeroing a
        fresh 64 KiB record cost 9 % of the sender's CPU). The end of ``sock`` is sent as FIN
        without waiting for window (a FIN carries none)."""
        session, fd = self.session, sock.fileno()
        spare: list[bytearray] = []  # full-size record buffers the writer is done with
        while True:
            session.wait_writable()
            if not readable_bytes(fd):
                spare.clear()  # an idle stream holds no buffers
            wait_read(fd)  # a loop turn per read even when data waits: other greenlets run
            ready = readable_bytes(fd)
            if not ready and not sock.recv(1, socket.MSG_PEEK):
                self.shutdown_write()  # EOF: a FIN needs no window, so wait for none
                return
            room = min(self._room(), max(1, ready or readable_bytes(fd)))
            records: list[memoryview] = []
            views: list[memoryview] = []
            while room > 0 and len(records) < PUMP_RECORDS:
                k = min(room, fr.MAX_PAYLOAD)
                buf = spare.pop() if spare and k == fr.MAX_PAYLOAD else \
                    bytearray(k + RECORD_OVERHEAD)
                record = memoryview(buf)
                records.append(record)
                views.append(record[2 + fr.HEADER_LEN:2 + fr.HEADER_LEN + k])
                room -= k
            n = sock.recvmsg_into(views)[0]
            if not n:
                self.shutdown_write()
                return
            if self.on_bytes is not None:
                self.on_bytes(n, 0)
            for record, view in zip(records, views, strict=True):
                k = min(n, len(view))
                if not k:
                    break
                session.seal_data(self.id, record[:k + RECORD_OVERHEAD])
                n -= k
            session.flush()
            if not session.queued:  # all sent: the full-size buffers are free again
                spare = [cast(bytearray, r.obj) for r in records
                         if len(r) == fr.MAX_PAYLOAD + RECORD_OVERHEAD]

    def drain_to(self, sock: socket.socket) -> None:
        """Pump the stream into ``sock`` until the peer's FIN (then SHUT_WR); raises
        StreamClosed / OSError. The reader sends to ``sock`` itself while it keeps up."""
        self.sink = sock
        try:
            while True:
                while self._chunks:  # many chunks per sendmsg (a burst that came before
                    # drain_to started is all queued); popped only once sent: keeps the order
                    sent = sock.sendmsg(list(itertools.islice(self._chunks, SEND_CHUNKS)))
                    self._sent(sent)
                    if self.on_bytes is not None:
                        self.on_bytes(0, sent)
                if self.error:
                    raise self.error
                if self.eof:
                    sock.shutdown(socket.SHUT_WR)
                    return
                self._readable.clear()
                if not self._chunks and not self.eof and not self.error:
                    self._readable.wait()
        finally:
            self.sink = None

    def send_datagram(self, data: bytes) -> bool:
        """One datagram as one DATA frame; False (dropped) when the window has no room."""
        if self.error:
            raise self.error
        if len(data) > fr.MAX_PAYLOAD or self.session.mux.send_window(self.id) < len(data):
            return False
        self.session.write(self.session.mux.send(self.id, data))
        return True

    def recv(self, timeout: float | None = None) -> bytes:
        """The next chunk (one DATA frame's payload); b"" at end of stream."""
        while not self._chunks:
            if self.error:
                raise self.error
            if self.eof:
                return b""
            self._readable.clear()
            if not self._chunks and not self.eof and not self.error:
                if not self._readable.wait(timeout):
                    raise TimeoutError("stream recv timed out")
        return bytes(self._pop())

    def shutdown_write(self) -> None:
        """Half-close: send FIN (no-op when the stream is already gone)."""
        info = self.session.mux.streams.get(self.id)
        if self.error is None and info is not None and not info.local_fin \
                and info.state is fr.StreamState.OPEN:
            self.session.write(self.session.mux.send(self.id, b"", fin=True))
            self.session.forget_if_done(self.id)

    def accept(self) -> None:
        """Tell the opener the target is connected; StreamClosed when the opener gave up
        (reset: its connect timeout passed) or the session ended meanwhile."""
        if self.error is not None:
            raise self.error
        if self.id not in self.session.mux.streams:
            raise StreamClosed("gone before it was accepted")
        self.session.write(self.session.mux.accept(self.id))

    def reset(self, code: int = fr.ResetCode.CANCEL, reason: str = "") -> None:
        frame = self.session.mux.reset(self.id, code, reason)
        self.session.streams.pop(self.id, None)
        if frame is not None and not self.session.closed:
            try:
                self.session.write(frame)
            except OSError:
                pass
        if self.error is None:
            self.on_reset(StreamClosed("reset locally", code))

