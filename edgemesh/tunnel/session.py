"""The I/O shell of one secure connection: handshake over a socket, then a reader greenlet that
feeds the sans-IO ``Mux``, a keepalive pinger, and ``Stream`` objects (``tunnel/stream.py``)
for the application.

Writing: a frame is encrypted the moment it is written (records must leave in nonce order, and
nothing yields between sealing and queueing), then queued; the writer sends what is queued
with one ``sendmsg`` per batch of records, trying at once without blocking first. Control
frames never wait; bulk data waits while more than ``WRITE_HIGH`` bytes are queued. Reads are
only ever done by the reader greenlet, straight into the record reader's buffer. DATA for a
stream pumped to a socket (``Stream.drain_to``) is sent to that socket by the reader itself
when it takes it without blocking (no greenlet switch per frame); the rest is queued for the
pump. Received bytes held here are bounded per session (``BUFFER_CAP``: the reader stops
reading while more is buffered) and per stream by its auto-tuned window (``frames.Mux``).
Everything that can block has a timeout or ends when the session closes.
"""
from __future__ import annotations

import collections
import itertools
import logging
import socket
import time
from collections.abc import Callable

import gevent
import gevent.event
from gevent.socket import wait_read

from edgemesh.errors import EdgeMeshError, RemoteProtocolError, UnavailableError
from edgemesh.runtime import metrics
from edgemesh.runtime.logs import Once
from edgemesh.runtime.tasks import spawn
from edgemesh.tunnel import control
from edgemesh.tunnel import frames as fr
from edgemesh.tunnel.handshake import Handshake, Hello, Result
from edgemesh.tunnel.policy import REFUSED
from edgemesh.tunnel.records import RecordReader, SecureChannel, frame_record
from edgemesh.tunnel.stream import (
    DEAD_AFTER,
    PING_INTERVAL,
    RECORD_OVERHEAD,
    Stream,
    StreamClosed,
    readable_bytes,
)
from edgemesh.tunnel.x25519 import StaticKey

log = logging.getLogger(__name__)
_once = Once()

HANDSHAKE_TIMEOUT = 10.0
IDLE_READ = 16 * 1024  # a read shorter than this gives the reader's buffer back
MAX_CONTROL = 60000
WRITE_HIGH = 1024 * 1024      # queued ciphertext above which bulk senders wait
WRITE_LOW = 256 * 1024        # ... until the writer brought it below this
SEND_BATCH = 64               # records per sendmsg
BUFFER_CAP = 32 * 1024 * 1024  # received bytes held for a session's consumers, at most

WIRE_BYTES = metrics.counter("edgemesh_tunnel_bytes_total",
                             "Encrypted bytes on tunnel connections, by peer and direction.",
                             ["peer", "direction"])
UNKNOWN_CONTROL = metrics.counter("edgemesh_tunnel_unknown_control_total",
                                  "Control messages of a kind this version does not know.")
SESSION_ERRORS = metrics.counter("edgemesh_tunnel_session_errors_total",
                                 "Sessions closed because the peer broke the protocol.",
                                 ["reason"])


def handshake_over(sock: socket.socket, initiator: bool, static: StaticKey, psk: bytes,
                   hello: Hello, timeout: float = HANDSHAKE_TIMEOUT,
                   reader: RecordReader | None = None) -> tuple[Result, RecordReader]:
    """Run the Noise handshake on ``sock``; the reader keeps any bytes read past it."""
    hs = Handshake(initiator, static, psk, hello)
    reader = reader or RecordReader()
    deadline = time.monotonic() + timeout
    while not hs.done:
        if hs.next_is_write:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            sock.sendall(frame_record(hs.write_message()))
        else:
            hs.read_message(read_record(sock, reader, deadline))
    sock.settimeout(None)
    assert hs.result is not None
    return hs.result, reader


def read_record(sock: socket.socket, reader: RecordReader, deadline: float) -> bytes:
    """One whole record from ``sock`` by ``deadline`` (socket.timeout / EOF as errors)."""
    while (body := reader.next_record()) is None:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(max(reader.wanted(), 4096))
        if not data:
            raise UnavailableError("connection closed during the handshake")
        reader.feed(data)
    return body


StreamHandler = Callable[["Session", Stream], None]
ControlHandler = Callable[["Session", control.Message], None]


class Session:
    """One authenticated, encrypted connection to a peer, carrying streams and control."""

    def __init__(self, sock: socket.socket, result: Result, reader: RecordReader, *,
                 initiator: bool, local_hello: Hello, path: str, address: str,
                 max_inbound: int = 1024, on_stream: StreamHandler | None = None,
                 on_control: ControlHandler | None = None,
                 on_close: Callable[["Session"], None] | None = None,
                 answer_unknown: bool = False) -> None:
        self.sock = sock
        self.peer = result.remote_hello.node
        self.peer_key = result.remote_static
        self.peer_hello = result.remote_hello
        self.initiator = initiator
        self.path = path
        self.address = address
        self.channel = SecureChannel(result.send, result.recv)
        self.reader = reader
        self.mux = fr.Mux(initiator, local_hello.window, result.remote_hello.window,
                          max_inbound)
        self.streams: dict[int, Stream] = {}
        self.on_stream = on_stream
        self.on_control = on_control
        self.on_close = on_close
        self.answer_unknown = answer_unknown
        self.rtt: float | None = None
        self.created = time.monotonic()
        self.last_seen = self.created
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False
        self.close_reason = ""
        self.buffered = 0  # received bytes queued for this session's streams
        self.touched: list[Stream] = []  # streams with a batch for their sink
        self._out: collections.deque[bytes | memoryview] = collections.deque()
        self._out_bytes = 0
        self._sending = False  # the writer greenlet is inside a (blocking) sendmsg
        self._out_ready = gevent.event.Event()
        self._drained = gevent.event.Event()
        self._unbuffered = gevent.event.Event()
        self._greenlets: list[gevent.Greenlet] = []
        self._in_metric = WIRE_BYTES.labels(self.peer, "in")
        self._out_metric = WIRE_BYTES.labels(self.peer, "out")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def start(self) -> None:
        self._greenlets = [spawn(f"tunnel-read-{self.peer}", self._read_loop),
                           spawn(f"tunnel-write-{self.peer}", self._write_loop),
                           spawn(f"tunnel-ping-{self.peer}", self._ping_loop)]

    # ---- application side ---------------------------------------------------------------------

    def open_stream(self, target: fr.Target, timeout: float | None) -> Stream:
        """A stream accepted by the peer; StreamClosed if it refused, UnavailableError else."""
        if self.closed:
            raise UnavailableError(f"session to {self.peer} is closed")
        sid, frame = self.mux.open(target)
        stream = Stream(self, sid, target)
        self.streams[sid] = stream
        self.write(frame)
        stream.wait_accepted(timeout)
        return stream

    def send_control(self, message: control.Message) -> None:
        payload = control.encode(message)
        if len(payload) > MAX_CONTROL:
            raise ValueError("control message too large")
        self.write(self.mux.control(payload))

    def write(self, *frames: fr.Frame) -> None:
        """Seal and queue ``frames`` (never blocks); the writer sends them."""
        if self.closed:
            raise UnavailableError(f"session to {self.peer} is closed")
        for f in frames:
            self._queue(self.channel.seal(fr.encode_frame(f)))
        self.flush()

    def write_data(self, sid: int, data: memoryview, fin: bool = False) -> None:
        """DATA frames carrying ``data`` (within the stream's window), waiting while the
        queue is above its high-water mark."""
        self.wait_writable()
        size = fr.MAX_PAYLOAD
        for pos in range(0, len(data), size):
            piece = data[pos:pos + size]
            record = memoryview(bytearray(len(piece) + RECORD_OVERHEAD))
            record[2 + fr.HEADER_LEN:2 + fr.HEADER_LEN + len(piece)] = piece
            self.seal_data(sid, record, fin and pos + size >= len(data))
        self.flush()

    def seal_data(self, sid: int, record: memoryview, fin: bool = False) -> None:
        """``record`` has its payload in place (after 2 + HEADER_LEN bytes, with 16 spare at
        the end): write the DATA header, seal it in place and queue it (``flush`` sends)."""
        if self.closed:
            raise UnavailableError(f"session to {self.peer} is closed")
        if sid not in self.mux.streams:
            raise StreamClosed("stream closed")
        n = len(record) - RECORD_OVERHEAD
        record[2:2 + fr.HEADER_LEN] = self.mux.data_header(sid, n, fin)
        self.channel.seal_in_place(record)
        self._queue(record)

    def _queue(self, record: bytes | memoryview) -> None:
        self._out.append(record)
        self._out_bytes += len(record)

    @property
    def queued(self) -> int:
        """Sealed bytes not yet sent."""
        return self._out_bytes

    def unbuffer(self, n: int) -> None:
        """``n`` received bytes left our buffers; the reader resumes below half the cap."""
        self.buffered -= n
        if self.buffered <= BUFFER_CAP // 2:
            self._unbuffered.set()

    def wait_writable(self) -> None:
        """Wait while too much is queued (bulk senders only)."""
        while self._out_bytes >= WRITE_HIGH and not self.closed:
            self._drained.clear()
            self._drained.wait(timeout=DEAD_AFTER)
        if self.closed:
            raise UnavailableError(f"session to {self.peer} is closed")

    def flush(self) -> None:
        """Send what is queued as far as the socket takes it now; the writer does the rest."""
        if self._sending or not self._out:
            return
        try:
            self._sent(self.sock.sendmsg(list(itertools.islice(self._out, SEND_BATCH)), (),
                                         socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._write_failed(e)
            return
        if self._out:
            self._out_ready.set()

    def _sent(self, n: int) -> None:
        self._out_bytes -= n
        self.bytes_out += n
        self._out_metric.inc(n)
        out = self._out
        while n:
            head = out[0]
            if n < len(head):
                out[0] = memoryview(head)[n:]
                break
            n -= len(head)
            out.popleft()
        if self._out_bytes < WRITE_LOW:
            self._drained.set()

    def _write_loop(self) -> None:
        while not self.closed:
            self._out_ready.wait()
            self._out_ready.clear()
            while self._out:
                self._sending = True
                try:
                    n = self.sock.sendmsg(list(itertools.islice(self._out, SEND_BATCH)))
                except OSError as e:
                    self._write_failed(e)
                    return
                finally:
                    self._sending = False
                self._sent(n)

    def _write_failed(self, e: OSError) -> None:
        self._out.clear()
        spawn(f"tunnel-close-{self.peer}", self.close, f"write failed: {e}")

    def forget_if_done(self, sid: int) -> None:
        """Drop our Stream object once the mux has closed the stream both ways."""
        if sid not in self.mux.streams:
            self.streams.pop(sid, None)

    @property
    def stream_count(self) -> int:
        return len(self.mux.streams)

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        try:
            self.write(self.mux.goaway(0, reason[:200]))  # sent if the socket takes it now
        except (EdgeMeshError, OSError):
            pass
        self.closed = True
        self._drained.set()
        self._unbuffered.set()
        self.close_reason = reason
        log.info("session to %s (%s %s) closed: %s", self.peer, self.path, self.address, reason)
        error = StreamClosed(f"session to {self.peer} closed: {reason}")
        for stream in list(self.streams.values()):
            stream.on_reset(error)
        self.streams.clear()
        try:
            self.sock.close()
        except OSError:
            pass
        current = gevent.getcurrent()
        for g in self._greenlets:
            if g is not current:
                g.kill(block=False)
        if self.on_close is not None:
            self.on_close(self)

    # ---- the reader ---------------------------------------------------------------------------

    def _read_loop(self) -> None:
        reason = "connection closed by peer"
        try:
            self._consume()  # bytes read along with the handshake
            while True:
                while self.buffered > BUFFER_CAP and not self.closed:
                    self._unbuffered.clear()  # consumers lag: stop reading (back-pressure)
                    self._unbuffered.wait(timeout=1.0)
                hint = 0
                if not self.reader.holding:
                    wait_read(self.sock.fileno())  # borrow the buffer only once readable
                    hint = readable_bytes(self.sock.fileno())  # and no more of it than needed
                space = self.reader.space(hint)
                n = self.sock.recv_into(space)
                if not n:
                    break
                self.reader.commit(n)
                self.bytes_in += n
                self._in_metric.inc(n)
                self.last_seen = time.monotonic()
                self._consume()
                if n < IDLE_READ:
                    self.reader.release()  # not a bulk flow: hold no buffer while idle
        except RemoteProtocolError as e:
            SESSION_ERRORS.labels(type(e).__name__).inc()
            reason = f"protocol error: {e}"
        except OSError as e:
            reason = f"read failed: {e}"
        finally:
            spawn(f"tunnel-close-{self.peer}", self.close, reason)

    def _consume(self) -> None:
        try:
            self._consume_records()
        finally:
            self._flush_batches()

    def _flush_batches(self) -> None:
        touched, self.touched = self.touched, []
        for stream in touched:
            stream.flush_batch()

    def _consume_records(self) -> None:
        while (body := self.reader.next_view()) is not None:
            plain = self.channel.open(body)
            if len(plain) >= fr.HEADER_LEN and plain[0] == fr.FrameType.DATA:
                _, flags, sid = fr.HEADER.unpack_from(plain)
                if sid == 0:
                    raise RemoteProtocolError("DATA frame on stream 0")
                events, replies = self.mux.receive_data(sid, memoryview(plain)[fr.HEADER_LEN:],
                                                        flags)
            else:
                self._flush_batches()  # other frames (FIN, RESET) come after the data
                events, replies = self.mux.receive(fr.decode_frame(plain))
            if replies:
                try:
                    self.write(*replies)
                except UnavailableError:
                    return
            for event in events:
                self._dispatch(event)

    def _dispatch(self, event: fr.Event) -> None:
        if isinstance(event, fr.DataReceived):
            stream = self.streams.get(event.stream)
            if stream is not None:
                stream.on_data(event.data)
        elif isinstance(event, fr.WindowOpened):
            stream = self.streams.get(event.stream)
            if stream is not None:
                stream.on_window()
        elif isinstance(event, fr.StreamEnded):
            stream = self.streams.get(event.stream)
            if stream is not None:
                stream.on_end()
                self.forget_if_done(event.stream)
        elif isinstance(event, fr.StreamAccepted):
            stream = self.streams.get(event.stream)
            if stream is not None:
                stream.on_accepted()
        elif isinstance(event, fr.StreamReset):
            stream = self.streams.pop(event.stream, None)
            if stream is not None:
                why = event.reason or event.code
                stream.on_reset(StreamClosed(f"refused by {self.peer}: {why}", event.code))
        elif isinstance(event, fr.StreamOpened):
            self._on_opened(event)
        elif isinstance(event, fr.PongReceived):
            self._on_pong(event.token)
        elif isinstance(event, fr.ControlReceived):
            self._on_control(event.payload)
        elif isinstance(event, fr.GoAwayReceived):
            log.info("%s is going away: %s", self.peer, event.reason)
        elif isinstance(event, fr.StreamRejected):
            REFUSED.labels(event.code.name.lower()).inc()

    def _on_opened(self, event: fr.StreamOpened) -> None:
        stream = Stream(self, event.stream, event.target)
        self.streams[event.stream] = stream
        if self.on_stream is None:
            stream.reset(fr.ResetCode.REFUSED, "this peer accepts no streams")
            return
        spawn(f"tunnel-stream-{self.peer}", self.on_stream, self, stream)

    def _on_control(self, payload: bytes) -> None:
        """A malformed message breaks the protocol (the session closes, naming the field); an
        unknown kind is counted, logged once and answered when ``answer_unknown``."""
        try:
            message = control.decode(payload)
        except control.UnknownKind as e:
            UNKNOWN_CONTROL.inc()
            if _once(("unknown-op", self.peer, e.op)):
                log.warning("%s sent an unknown control message %r (logged once)", self.peer,
                            e.op)
            if self.answer_unknown and not self.closed:
                self.send_control(control.Error(e.id, str(e)))
            return
        if self.on_control is not None:
            spawn(f"tunnel-control-{self.peer}", self.on_control, self, message)

    # ---- keepalive ----------------------------------------------------------------------------

    def ping(self) -> None:
        self.write(self.mux.ping(time.monotonic_ns().to_bytes(8, "big")))

    def _on_pong(self, token: bytes) -> None:
        sent = int.from_bytes(token, "big")
        rtt = (time.monotonic_ns() - sent) / 1e9
        if 0 <= rtt < 3600:
            self.rtt = rtt

    def _ping_loop(self) -> None:
        while not self.closed:
            try:
                self.ping()
            except UnavailableError:
                return
            gevent.sleep(PING_INTERVAL)
            if time.monotonic() - self.last_seen > DEAD_AFTER:
                self.close("peer silent (keepalive timeout)")
                return
