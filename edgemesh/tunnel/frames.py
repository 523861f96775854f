"""Sans-IO frames and the stream multiplexer of one tunnel session.

A frame is ``type u8 | flags u8 | stream u32 (big-endian) | payload``; the record around it gives
its length (docs/tunnel-protocol.md). ``Mux`` holds the state of every stream: who opened it,
whether it was accepted, each direction's flow-control window, half-closes. It takes received
frames and returns events plus frames to send back; its methods return frames to send. It does
no I/O and no crypto, so it is tested (and fuzzed) with plain values.
"""
from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass, field

from edgemesh.errors import LocalProtocolError, RemoteProtocolError

HEADER = struct.Struct(">BBI")
HEADER_LEN = HEADER.size
MAX_PAYLOAD = 65535 - 16 - HEADER_LEN  # one frame per record, minus the AEAD tag
FLAG_FIN = 0x1  # DATA: the sender will send no more on this stream
FLAG_ACK = 0x1  # PING: this is the answer
# A stream's receive window starts at INITIAL_WINDOW (our Hello) and may grow up to
# MAX_STREAM_WINDOW. Starting at 256 KiB measured 0.26x raw against 0.35x for 4 MiB in
# bench/tunnel.py (growth came too late), so both are 4 MiB for now; what a peer can make us
# hold is bounded per session by session.BUFFER_CAP whatever the windows.
INITIAL_WINDOW = 4 * 1024 * 1024
MAX_STREAM_WINDOW = 4 * 1024 * 1024
SESSION_WINDOW_BUDGET = 16 * 1024 * 1024  # ... while the session's windows sum below this


class FrameType(enum.IntEnum):
    DATA = 0
    OPEN = 1
    ACCEPT = 2
    RESET = 3
    WINDOW = 4
    PING = 5
    GOAWAY = 6
    CONTROL = 7


class ResetCode(enum.IntEnum):
    CANCEL = 0            # the opener or receiver gave up (normal abort)
    NOT_LOCAL = 1         # target is not an endpoint on the receiving node
    CONNECT_FAILED = 2    # the receiving node could not reach its local endpoint
    TOO_MANY_STREAMS = 3
    FLOW_CONTROL = 4      # the peer sent more than its window
    BAD_TARGET = 5        # OPEN payload malformed
    REFUSED = 6           # this peer does not accept streams (a server)
    INTERNAL = 7


class Proto(enum.IntEnum):
    TCP = 6
    UDP = 17


@dataclass(frozen=True)
class Frame:
    type: FrameType
    stream: int = 0
    payload: bytes = b""
    flags: int = 0


def encode_frame(frame: Frame) -> bytes:
    if len(frame.payload) > MAX_PAYLOAD:
        raise LocalProtocolError("frame payload too large")
    return HEADER.pack(frame.type, frame.flags, frame.stream) + frame.payload


def decode_frame(data: bytes) -> Frame:
    """One frame from one decrypted record body; RemoteProtocolError when malformed."""
    if len(data) < HEADER_LEN:
        raise RemoteProtocolError("frame shorter than its header")
    kind, flags, stream = HEADER.unpack_from(data)
    try:
        ftype = FrameType(kind)
    except ValueError:
        raise RemoteProtocolError(f"unknown frame type {kind}") from None
    payload = data[HEADER_LEN:]
    _check_shape(ftype, stream, payload)
    return Frame(ftype, stream, payload, flags)


def _check_shape(ftype: FrameType, stream: int, payload: bytes) -> None:
    on_stream = ftype in (FrameType.DATA, FrameType.OPEN, FrameType.ACCEPT, FrameType.RESET,
                          FrameType.WINDOW)
    if on_stream != (stream != 0):
        raise RemoteProtocolError(f"{ftype.name} frame on stream {stream}")
    sizes = {FrameType.WINDOW: (4, 4), FrameType.PING: (8, 8), FrameType.ACCEPT: (0, 0),
             FrameType.RESET: (2, 1024), FrameType.GOAWAY: (2, 1024), FrameType.OPEN: (8, 20)}
    lo, hi = sizes.get(ftype, (0, MAX_PAYLOAD))
    if not lo <= len(payload) <= hi:
        raise RemoteProtocolError(f"{ftype.name} payload of {len(payload)} bytes")


@dataclass(frozen=True)
class Target:
    """What a stream asks the receiving node to connect to."""
    proto: Proto
    ip: str
    port: int

    def encode(self) -> bytes:
        addr = ipaddress.ip_address(self.ip)
        return struct.pack(">BBH", self.proto, addr.version, self.port) + addr.packed

    @classmethod
    def decode(cls, data: bytes) -> "Target":
        if len(data) < 4:
            raise RemoteProtocolError("OPEN target too short")
        proto, family, port = struct.unpack_from(">BBH", data)
        rest = data[4:]
        if proto not in (6, 17) or (family, len(rest)) not in ((4, 4), (6, 16)) or port == 0:
            raise RemoteProtocolError("OPEN target malformed")
        return cls(Proto(proto), str(ipaddress.ip_address(rest)), port)


def reset_payload(code: int, reason: str) -> bytes:
    return struct.pack(">H", code) + reason.encode()[:1000]


def parse_reset(payload: bytes) -> tuple[int, str]:
    return struct.unpack_from(">H", payload)[0], payload[2:].decode("utf-8", "replace")


# ---- events -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamOpened:
    stream: int
    target: Target


@dataclass(frozen=True)
class StreamAccepted:
    stream: int


@dataclass(frozen=True)
class StreamReset:
    stream: int
    code: int
    reason: str


@dataclass(frozen=True)
class StreamRejected:
    """We refused a stream the peer opened, before the application saw it."""
    stream: int
    code: ResetCode


@dataclass(frozen=True)
class DataReceived:
    stream: int
    data: bytes | memoryview


@dataclass(frozen=True)
class StreamEnded:
    """The peer half-closed the stream (FIN)."""
    stream: int


@dataclass(frozen=True)
class WindowOpened:
    stream: int


@dataclass(frozen=True)
class PongReceived:
    token: bytes


@dataclass(frozen=True)
class ControlReceived:
    payload: bytes


@dataclass(frozen=True)
class GoAwayReceived:
    code: int
    reason: str


Event = (StreamOpened | StreamAccepted | StreamReset | StreamRejected | DataReceived
         | StreamEnded | WindowOpened | PongReceived | ControlReceived | GoAwayReceived)


class StreamState(enum.Enum):
    OPENING = "opening"   # we sent OPEN, no ACCEPT yet
    PENDING = "pending"   # peer sent OPEN, we have not accepted yet
    OPEN = "open"


@dataclass
class StreamInfo:
    id: int
    local: bool              # we opened it
    state: StreamState
    send_window: int         # bytes we may still send
    recv_window: int         # bytes the peer may still send
    unacked: int = 0         # bytes consumed locally but not yet granted back
    local_fin: bool = False
    remote_fin: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    target: Target | None = field(default=None)
    window: int = 0          # the receive window we aim to keep granted (auto-tuned)


class Mux:
    """Stream state of one session. ``initiator`` (of the handshake) uses odd stream ids.

    Receive windows start at ``local_window`` and are auto-tuned: when we grant credit back and
    the consumer kept up (``consumed(..., backlog=B)`` with B, the stream's bytes still
    buffered here, at most a quarter of its window), the stream's window doubles, up to
    ``max_window``, as long as the windows
    of all streams sum to at most ``budget``. A stream whose consumer lags keeps its window,
    so what a peer can make us buffer stays bounded.
    """

    def __init__(self, initiator: bool, local_window: int, remote_window: int,
                 max_inbound: int = 1024, max_window: int = MAX_STREAM_WINDOW,
                 budget: int = SESSION_WINDOW_BUDGET) -> None:
        self.local_window = local_window      # what we grant per stream, at first
        self.remote_window = remote_window    # what the peer grants per stream
        self.max_inbound = max_inbound
        self.max_window = max(max_window, local_window)
        self.budget = budget
        self.window_total = 0                 # sum of the streams' receive windows
        self.streams: dict[int, StreamInfo] = {}
        self._next_id = 1 if initiator else 2
        self._last_remote = 0
        self._remote_parity = 0 if initiator else 1
        self.inbound = 0
        self.goaway_received = False

    # ---- our actions --------------------------------------------------------------------------

    def open(self, target: Target) -> tuple[int, Frame]:
        if self.goaway_received:
            raise LocalProtocolError("peer is going away")
        sid = self._next_id
        self._next_id += 2
        if sid > 0xFFFFFFFF:
            raise LocalProtocolError("stream ids exhausted")
        self._add(StreamInfo(sid, True, StreamState.OPENING, self.remote_window,
                             self.local_window, target=target))
        return sid, Frame(FrameType.OPEN, sid, target.encode())

    def accept(self, sid: int) -> Frame:
        info = self._get(sid)
        if info.state is not StreamState.PENDING:
            raise LocalProtocolError(f"stream {sid} is not waiting to be accepted")
        info.state = StreamState.OPEN
        return Frame(FrameType.ACCEPT, sid)

    def reset(self, sid: int, code: int, reason: str = "") -> Frame | None:
        """Abort a stream; None when it is already gone (nothing to send)."""
        info = self.streams.pop(sid, None)
        if info is None:
            return None
        self._forget(info)
        return Frame(FrameType.RESET, sid, reset_payload(code, reason))

    def send_window(self, sid: int) -> int:
        info = self.streams.get(sid)
        if info is None or info.local_fin or info.state is not StreamState.OPEN:
            return 0
        return min(info.send_window, MAX_PAYLOAD)

    def send_room(self, sid: int) -> int:
        """Bytes the stream may send now, over as many DATA frames as needed."""
        info = self.streams.get(sid)
        if info is None or info.local_fin or info.state is not StreamState.OPEN:
            return 0
        return info.send_window

    def send(self, sid: int, data: bytes, fin: bool = False) -> Frame:
        """One DATA frame; ``data`` must fit ``send_window(sid)``."""
        return Frame(FrameType.DATA, sid, data, self._take(sid, len(data), fin))

    def data_header(self, sid: int, n: int, fin: bool = False) -> bytes:
        """The header of one DATA frame of ``n`` payload bytes (the bulk path's ``send``)."""
        return HEADER.pack(FrameType.DATA, self._take(sid, n, fin), sid)

    def _take(self, sid: int, n: int, fin: bool) -> int:
        info = self._get(sid)
        if info.local_fin or info.state is not StreamState.OPEN:
            raise LocalProtocolError(f"stream {sid} cannot send")
        if n > min(info.send_window, MAX_PAYLOAD):
            raise LocalProtocolError("data exceeds the send window")
        info.send_window -= n
        info.bytes_out += n
        if fin:
            info.local_fin = True
        self._maybe_close(info)
        return FLAG_FIN if fin else 0

    def consumed(self, sid: int, n: int, backlog: int | None = None) -> Frame | None:
        """We delivered ``n`` received bytes; grant them back once half a window is due.

        ``backlog``: bytes of this stream still buffered here; small means the consumer keeps
        up, so the window may grow (see the class docstring). None: never grow.
        """
        info = self.streams.get(sid)
        if info is None or info.remote_fin:
            return None
        info.unacked += n
        if info.unacked < info.window // 2:
            return None
        grant, info.unacked = info.unacked, 0
        if backlog is not None and backlog <= info.window // 4 \
                and info.window < self.max_window:
            more = min(info.window, self.max_window - info.window,
                       self.budget - self.window_total)
            if more > 0:
                info.window += more
                self.window_total += more
                grant += more
        info.recv_window += grant
        return Frame(FrameType.WINDOW, sid, struct.pack(">I", grant))

    def ping(self, token: bytes) -> Frame:
        return Frame(FrameType.PING, 0, token)

    def control(self, payload: bytes) -> Frame:
        return Frame(FrameType.CONTROL, 0, payload)

    def goaway(self, code: int = 0, reason: str = "") -> Frame:
        return Frame(FrameType.GOAWAY, 0, reset_payload(code, reason))

    # ---- the peer's frames --------------------------------------------------------------------

    def receive(self, frame: Frame) -> tuple[list[Event], list[Frame]]:
        """Apply one received frame: events for the application, frames to send back.

        RemoteProtocolError means the session itself is broken and must be closed.
        """
        handler = _HANDLERS[frame.type]
        return handler(self, frame)

    def _on_open(self, f: Frame) -> tuple[list[Event], list[Frame]]:
        sid = f.stream
        if sid % 2 != self._remote_parity or sid <= self._last_remote:
            raise RemoteProtocolError(f"peer opened stream {sid} out of order")
        self._last_remote = sid
        try:
            target = Target.decode(f.payload)
        except RemoteProtocolError:
            return ([StreamRejected(sid, ResetCode.BAD_TARGET)],
                    [Frame(FrameType.RESET, sid, reset_payload(ResetCode.BAD_TARGET, "bad"))])
        if self.inbound >= self.max_inbound:
            return ([StreamRejected(sid, ResetCode.TOO_MANY_STREAMS)],
                    [Frame(FrameType.RESET, sid,
                           reset_payload(ResetCode.TOO_MANY_STREAMS, "too many streams"))])
        self.inbound += 1
        self._add(StreamInfo(sid, False, StreamState.PENDING, self.remote_window,
                             self.local_window, target=target))
        return [StreamOpened(sid, target)], []

    def _on_accept(self, f: Frame) -> tuple[list[Event], list[Frame]]:
        info = self.streams.get(f.stream)
        if info is None:
            return [], []  # we already reset it
        if not info.local or info.state is not StreamState.OPENING:
            raise RemoteProtocolError(f"unexpected ACCEPT on stream {f.stream}")
        info.state = StreamState.OPEN
        return [StreamAccepted(f.stream)], []

    def _on_data(self, f: Frame) -> tuple[list[Event], list[Frame]]:
        return self.receive_data(f.stream, f.payload, f.flags)

    def receive_data(self, sid: int, payload: bytes | memoryview,
                     flags: int) -> tuple[list[Event], list[Frame]]:
        """A DATA frame's parts (the session's fast path; ``receive`` for a whole Frame)."""
        info = self.streams.get(sid)
        if info is None:
            self._check_known(sid)
            return [], []  # late data for a stream we reset
        if info.remote_fin or info.state is not StreamState.OPEN:
            raise RemoteProtocolError(f"DATA on stream {sid} in state {info.state.value}")
        if len(payload) > info.recv_window:
            self.streams.pop(sid, None)
            self._forget(info)
            return ([StreamReset(sid, ResetCode.FLOW_CONTROL, "window exceeded")],
                    [Frame(FrameType.RESET, sid,
                           reset_payload(ResetCode.FLOW_CONTROL, "window exceeded"))])
        info.recv_window -= len(payload)
        info.bytes_in += len(payload)
        events: list[Event] = [DataReceived(sid, payload)] if payload else []
        if flags & FLAG_FIN:
            info.remote_fin = True
            events.append(StreamEnded(sid))
            self._maybe_close(info)
        return events, []

    def _on_window(self, f: Frame) -> tuple[list[Event], list[Frame]]:
        info = self.streams.get(f.stream)
        if info is None:
            self._check_known(f.stream)
            return [], []
        (grant,) = struct.unpack(">I", f.payload)
        if grant == 0 or info.send_window + grant > 2**31 - 1:
            raise RemoteProtocolError("bad WINDOW increment")
        info.send_window += grant
        return [WindowOpened(f.stream)], []

    def _on_reset(self, f: Frame) -> tuple[list[Event], list[Frame]]:
        info = self.streams.pop(f.stream, None)
        if info is None:
            self._check_known(f.stream)
            return [], []
        self._forget(info)
        code, reason = parse_reset(f.payload)
        return [StreamReset(f.stream, code, reason)], []

    def _on_ping(self, f: Frame) -> tuple[list[Event], list[Frame]]:
        if f.flags & FLAG_ACK:
            return [PongReceived(f.payload)], []
        return [], [Frame(FrameType.PING, 0, f.payload, FLAG_ACK)]

    def _on_goaway(self, f: Frame) -> tuple[list[Event], list[Frame]]:
        self.goaway_received = True
        code, reason = parse_reset(f.payload)
        return [GoAwayReceived(code, reason)], []

    def _on_control(self, f: Frame) -> tuple[list[Event], list[Frame]]:
        return [ControlReceived(f.payload)], []

    # ---- bookkeeping --------------------------------------------------------------------------

    def _get(self, sid: int) -> StreamInfo:
        info = self.streams.get(sid)
        if info is None:
            raise LocalProtocolError(f"no stream {sid}")
        return info

    def _check_known(self, sid: int) -> None:
        """A frame for a stream we do not hold must be for one that existed once."""
        mine = sid % 2 != self._remote_parity
        if (mine and sid >= self._next_id) or (not mine and sid > self._last_remote):
            raise RemoteProtocolError(f"frame for stream {sid} that was never opened")

    def _maybe_close(self, info: StreamInfo) -> None:
        if info.local_fin and info.remote_fin:
            self.streams.pop(info.id, None)
            self._forget(info)

    def _add(self, info: StreamInfo) -> None:
        info.window = self.local_window
        self.window_total += info.window
        self.streams[info.id] = info

    def _forget(self, info: StreamInfo) -> None:
        self.window_total -= info.window
        if not info.local:
            self.inbound -= 1


_HANDLERS = {
    FrameType.OPEN: Mux._on_open, FrameType.ACCEPT: Mux._on_accept,
    FrameType.DATA: Mux._on_data, FrameType.WINDOW: Mux._on_window,
    FrameType.RESET: Mux._on_reset, FrameType.PING: Mux._on_ping,
    FrameType.GOAWAY: Mux._on_goaway, FrameType.CONTROL: Mux._on_control,
}
