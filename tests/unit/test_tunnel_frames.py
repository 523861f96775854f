"""The sans-IO multiplexer as playbooks: given these frames, expect these events and replies."""
from __future__ import annotations

import pytest

from edgemesh.errors import LocalProtocolError, RemoteProtocolError
from edgemesh.tunnel import frames as fr

T = fr.Target(fr.Proto.TCP, "10.0.0.5", 8080)


def pair(window: int = 100_000, max_inbound: int = 8):
    a = fr.Mux(True, window, window, max_inbound)
    b = fr.Mux(False, window, window, max_inbound)
    return a, b


def deliver(to: fr.Mux, frame: fr.Frame):
    """Through the codec, as on the wire."""
    return to.receive(fr.decode_frame(fr.encode_frame(frame)))


def test_open_accept_data_fin_both_ways_closes_the_stream():
    a, b = pair()
    sid, f = a.open(T)
    assert sid == 1
    events, _ = deliver(b, f)
    assert events == [fr.StreamOpened(1, T)]
    assert a.send_window(1) == 0  # not accepted yet
    events, _ = deliver(a, b.accept(1))
    assert events == [fr.StreamAccepted(1)]
    events, _ = deliver(b, a.send(1, b"hello", fin=True))
    assert events == [fr.DataReceived(1, b"hello"), fr.StreamEnded(1)]
    events, _ = deliver(a, b.send(1, b"bye", fin=True))
    assert events == [fr.DataReceived(1, b"bye"), fr.StreamEnded(1)]
    assert a.streams == {} and b.streams == {} and b.inbound == 0


def test_flow_control_window_is_enforced_and_granted_back():
    a, b = pair(window=65536)
    sid, f = a.open(T)
    deliver(b, f)
    deliver(a, b.accept(sid))
    sent = 0
    while (n := a.send_window(sid)):
        deliver(b, a.send(sid, b"x" * n))
        sent += n
    assert sent == 65536
    with pytest.raises(LocalProtocolError):
        a.send(sid, b"y")
    assert b.consumed(sid, 1000) is None  # below half a window: no grant yet
    grant = b.consumed(sid, 40000)
    events, _ = deliver(a, grant)
    assert events == [fr.WindowOpened(sid)] and a.send_window(sid) == 41000


def test_a_peer_exceeding_the_window_gets_its_stream_reset():
    a, b = pair(window=65536)
    sid, f = a.open(T)
    deliver(b, f)
    deliver(a, b.accept(sid))
    events, replies = b.receive(fr.Frame(fr.FrameType.DATA, sid, b"z" * 65536))
    assert events[0] == fr.DataReceived(sid, b"z" * 65536)
    events, replies = b.receive(fr.Frame(fr.FrameType.DATA, sid, b"z"))
    assert isinstance(events[0], fr.StreamReset) and events[0].code == fr.ResetCode.FLOW_CONTROL
    assert replies[0].type is fr.FrameType.RESET


def test_inbound_stream_limit_refuses_extra_streams():
    a, b = pair(max_inbound=2)
    results = [deliver(b, a.open(T)[1]) for _ in range(3)]
    assert isinstance(results[2][0][0], fr.StreamRejected)
    assert results[2][1][0].type is fr.FrameType.RESET
    assert b.inbound == 2


def test_out_of_order_or_wrong_parity_stream_ids_break_the_session():
    _, b = pair()
    with pytest.raises(RemoteProtocolError):
        b.receive(fr.Frame(fr.FrameType.OPEN, 2, T.encode()))  # b's own parity
    b.receive(fr.Frame(fr.FrameType.OPEN, 5, T.encode()))
    with pytest.raises(RemoteProtocolError):
        b.receive(fr.Frame(fr.FrameType.OPEN, 3, T.encode()))
    with pytest.raises(RemoteProtocolError):
        b.receive(fr.Frame(fr.FrameType.DATA, 99, b"x"))  # never opened


def test_late_frames_for_a_reset_stream_are_ignored():
    a, b = pair()
    sid, f = a.open(T)
    deliver(b, f)
    deliver(a, b.accept(sid))
    reset = a.reset(sid, fr.ResetCode.CANCEL, "bye")
    data = b.send(sid, b"late")
    assert deliver(a, data) == ([], [])
    events, _ = deliver(b, reset)
    assert events == [fr.StreamReset(sid, fr.ResetCode.CANCEL, "bye")]


def test_ping_is_answered_and_pong_reported():
    a, b = pair()
    _, replies = deliver(b, a.ping(b"12345678"))
    assert replies == [fr.Frame(fr.FrameType.PING, 0, b"12345678", fr.FLAG_ACK)]
    events, _ = deliver(a, replies[0])
    assert events == [fr.PongReceived(b"12345678")]


def test_targets_round_trip_and_bad_ones_are_rejected():
    for t in (T, fr.Target(fr.Proto.UDP, "fd00::1", 53)):
        assert fr.Target.decode(t.encode()) == t
    _, b = pair()
    bad = fr.Frame(fr.FrameType.OPEN, 1, bytes([9, 4, 0, 80, 1, 2, 3, 4]))
    events, replies = b.receive(bad)
    assert events == [fr.StreamRejected(1, fr.ResetCode.BAD_TARGET)]


@pytest.mark.parametrize("raw", [b"", b"\x00\x00\x00\x00", b"\x09\x00\x00\x00\x00\x01",
                                 b"\x05\x00\x00\x00\x00\x00abc",     # ping not 8 bytes
                                 b"\x00\x00\x00\x00\x00\x00data",    # DATA on stream 0
                                 b"\x07\x00\x00\x00\x00\x01{}"])     # CONTROL on a stream
def test_malformed_frames_are_remote_errors(raw):
    with pytest.raises(RemoteProtocolError):
        fr.decode_frame(raw)


def test_windows_grow_only_while_the_consumer_keeps_up_and_within_the_budget():
    a = fr.Mux(True, 65536, 65536)
    b = fr.Mux(False, 65536, 65536, max_window=262144, budget=65536 + 131072)
    sid, f = a.open(T)
    deliver(b, f)
    deliver(a, b.accept(sid))

    def round_trip(backlog):
        room = a.send_room(sid)
        while (n := min(a.send_room(sid), fr.MAX_PAYLOAD)):
            b.receive_data(sid, b"x" * n, fr.HEADER.unpack(a.data_header(sid, n))[1])
        grant = b.consumed(sid, room, backlog)
        deliver(a, grant)
        return a.send_room(sid)

    assert round_trip(backlog=60000) == 65536       # consumer lags: window stays
    assert round_trip(backlog=0) == 131072          # keeps up: doubles
    assert round_trip(backlog=0) == 196608          # ... until the session budget is used
    assert b.window_total == 65536 + 131072
    assert round_trip(backlog=None) == 196608       # None: never grows
