"""The I/O shell of one secure connection: handshake over a socket, then a reader greenlet that
feeds the sans-IO ``Mux``, a keepalive pinger, and ``Stream`` objects for the application.

Writes from many greenlets go through one lock (records must leave in nonce order). Reads are
only ever done by the reader greenlet. Everything that can block has a timeout or ends when
the session closes.
"""
from __future__ import annotations

import collections
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.lock
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edgemesh.errors import EdgeMeshError, RemoteProtocolError, UnavailableError
from edgemesh.runtime import metrics
from edgemesh.runtime.tasks import spawn
from edgemesh.tunnel import frames as fr
from edgemesh.tunnel.handshake import Handshake, Hello, Result
from edgemesh.tunnel.records import RecordReader, SecureChannel, frame_record

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
PING_INTERVAL = 10.0
DEAD_AFTER = 3 * PING_INTERVAL + 5
READ_SIZE = 256 * 1024
MAX_CONTROL = 60000

WIRE_BYTES = metrics.counter("edgemesh_tunnel_bytes_total",
                             "Encrypted bytes on tunnel connections, by peer and direction.",
                             ["peer", "direction"])
SESSION_ERRORS = metrics.counter("edgemesh_tunnel_session_errors_total",
                                 "Sessions closed because the peer broke the protocol.",
                                 ["reason"])


class StreamClosed(UnavailableError):
    """The stream was reset by the peer, or its session ended."""

    def __init__(self, message: str, code: int = fr.ResetCode.CANCEL) -> None:
        super().__init__(message)
        self.code = code


def handshake_over(sock: socket.socket, initiator: bool, static: X25519PrivateKey, psk: bytes,
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


class Stream:
    """One multiplexed stream: blocking ``send``/``recv`` for greenlets, flow-controlled."""

    def __init__(self, session: "Session", sid: int, target: fr.Target) -> None:
        self.session = session
        self.id = sid
        self.target = target
        self._chunks: collections.deque[bytes] = collections.deque()
        self._readable = gevent.event.Event()
        self._writable = gevent.event.Event()
        self._accepted = gevent.event.Event()
        self.eof = False
        self.error: StreamClosed | None = None

    # called by the session's reader --------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._readable.set()

    def _end(self) -> None:
        self.eof = True
        self._readable.set()

    def _fail(self, error: StreamClosed) -> None:
        self.error = error
        for event in (self._readable, self._writable, self._accepted):
            event.set()

    # the application's side ---------------------------------------------------------------------
    def wait_accepted(self, timeout: float | None) -> None:
        if not self._accepted.wait(timeout):
            self.reset()
            raise UnavailableError(f"stream to {self.session.peer} not accepted in time")
        if self.error:
            raise self.error

    def send(self, data: bytes | memoryview, fin: bool = False) -> None:
        """Send all of ``data`` (waiting for window as needed); ``fin`` half-closes after it."""
        mux = self.session.mux
        view = memoryview(data)
        while True:
            if self.error:
                raise self.error
            if self.id not in mux.streams:
                raise StreamClosed("stream closed")
            n = mux.send_window(self.id)
            if n == 0 and view:
                self._writable.clear()
                if mux.send_window(self.id) == 0:
                    self._writable.wait(timeout=DEAD_AFTER)
                continue
            chunk, view = bytes(view[:n]), view[n:]
            last = fin and not view
            if chunk or last:
                self.session.write(mux.send(self.id, chunk, last))
            if not view:
                self.session.forget_if_done(self.id)
                return

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
        data = self._chunks.popleft()
        grant = self.session.mux.consumed(self.id, len(data))
        if grant is not None:
            self.session.write(grant)
        return data

    def shutdown_write(self) -> None:
        """Half-close: send FIN (no-op when the stream is already gone)."""
        info = self.session.mux.streams.get(self.id)
        if self.error is None and info is not None and not info.local_fin \
                and info.state is fr.StreamState.OPEN:
            self.session.write(self.session.mux.send(self.id, b"", fin=True))
            self.session.forget_if_done(self.id)

    def accept(self) -> None:
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
            self._fail(StreamClosed("reset locally", code))


StreamHandler = Callable[["Session", Stream], None]
ControlHandler = Callable[["Session", dict[str, Any]], None]


class Session:
    """One authenticated, encrypted connection to a peer, carrying streams and control."""

    def __init__(self, sock: socket.socket, result: Result, reader: RecordReader, *,
                 initiator: bool, local_hello: Hello, path: str, address: str,
                 max_inbound: int = 1024, on_stream: StreamHandler | None = None,
                 on_control: ControlHandler | None = None,
                 on_close: Callable[["Session"], None] | None = None) -> None:
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
        self.rtt: float | None = None
        self.created = time.monotonic()
        self.last_seen = self.created
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False
        self.close_reason = ""
        self._lock = gevent.lock.Semaphore()
        self._greenlets: list[gevent.Greenlet] = []
        self._in_metric = WIRE_BYTES.labels(self.peer, "in")
        self._out_metric = WIRE_BYTES.labels(self.peer, "out")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def start(self) -> None:
        self._greenlets = [spawn(f"tunnel-read-{self.peer}", self._read_loop),
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

    def send_control(self, message: dict[str, Any]) -> None:
        payload = json.dumps(message, separators=(",", ":")).encode()
        if len(payload) > MAX_CONTROL:
            raise ValueError("control message too large")
        self.write(self.mux.control(payload))

    def write(self, *frames: fr.Frame) -> None:
        if self.closed:
            raise UnavailableError(f"session to {self.peer} is closed")
        with self._lock:
            data = b"".join(self.channel.seal(fr.encode_frame(f)) for f in frames)
            try:
                self.sock.sendall(data)
            except OSError as e:
                gevent.spawn(self.close, f"write failed: {e}")
                raise UnavailableError(f"session to {self.peer}: {e}") from e
        self.bytes_out += len(data)
        self._out_metric.inc(len(data))

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
            with gevent.Timeout(1, False):
                self.write(self.mux.goaway(0, reason[:200]))
        except (EdgeMeshError, OSError):
            pass
        self.closed = True
        self.close_reason = reason
        log.info("session to %s (%s %s) closed: %s", self.peer, self.path, self.address, reason)
        error = StreamClosed(f"session to {self.peer} closed: {reason}")
        for stream in list(self.streams.values()):
            stream._fail(error)
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
                data = self.sock.recv(READ_SIZE)
                if not data:
                    break
                self.bytes_in += len(data)
                self._in_metric.inc(len(data))
                self.last_seen = time.monotonic()
                self.reader.feed(data)
                self._consume()
        except RemoteProtocolError as e:
            SESSION_ERRORS.labels(type(e).__name__).inc()
            reason = f"protocol error: {e}"
        except OSError as e:
            reason = f"read failed: {e}"
        finally:
            gevent.spawn(self.close, reason)

    def _consume(self) -> None:
        while (body := self.reader.next_record()) is not None:
            frame = fr.decode_frame(self.channel.open(body))
            events, replies = self.mux.receive(frame)
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
                stream._feed(event.data)
        elif isinstance(event, fr.WindowOpened):
            stream = self.streams.get(event.stream)
            if stream is not None:
                stream._writable.set()
        elif isinstance(event, fr.StreamEnded):
            stream = self.streams.get(event.stream)
            if stream is not None:
                stream._end()
                self.forget_if_done(event.stream)
        elif isinstance(event, fr.StreamAccepted):
            stream = self.streams.get(event.stream)
            if stream is not None:
                stream._accepted.set()
                stream._writable.set()
        elif isinstance(event, fr.StreamReset):
            stream = self.streams.pop(event.stream, None)
            if stream is not None:
                stream._fail(StreamClosed(f"refused by {self.peer}: {event.reason or event.code}",
                                          event.code))
        elif isinstance(event, fr.StreamOpened):
            self._on_opened(event)
        elif isinstance(event, fr.PongReceived):
            self._on_pong(event.token)
        elif isinstance(event, fr.ControlReceived):
            self._on_control(event.payload)
        elif isinstance(event, fr.GoAwayReceived):
            log.info("%s is going away: %s", self.peer, event.reason)
        elif isinstance(event, fr.StreamRejected):
            from edgemesh.tunnel.policy import REFUSED
            REFUSED.labels(event.code.name.lower()).inc()

    def _on_opened(self, event: fr.StreamOpened) -> None:
        stream = Stream(self, event.stream, event.target)
        self.streams[event.stream] = stream
        if self.on_stream is None:
            stream.reset(fr.ResetCode.REFUSED, "this peer accepts no streams")
            return
        spawn(f"tunnel-stream-{self.peer}", self.on_stream, self, stream)

    def _on_control(self, payload: bytes) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            raise RemoteProtocolError("control message is not JSON") from None
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise RemoteProtocolError("control message without op")
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
