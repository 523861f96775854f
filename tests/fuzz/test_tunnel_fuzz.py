"""Fuzzing every parser of untrusted tunnel bytes: records, frames, the mux, hellos, handshakes,
control messages.

Property: arbitrary input either parses or raises RemoteProtocolError — never anything else.
"""
from __future__ import annotations

import json

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemesh.errors import RemoteProtocolError
from edgemesh.tunnel import control
from edgemesh.tunnel import frames as fr
from edgemesh.tunnel.handshake import Handshake, Hello
from edgemesh.tunnel.records import RecordReader, frame_record

PSK = b"k" * 32
frame_types = st.sampled_from(list(fr.FrameType))
frames = st.builds(fr.Frame, frame_types, st.integers(0, 2**32 - 1), st.binary(max_size=64),
                   st.integers(0, 255))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_decode_frame_never_crashes(data):
    try:
        frame = fr.decode_frame(data)
    except RemoteProtocolError:
        return
    assert fr.decode_frame(fr.encode_frame(frame)) == frame


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, max_size=30), st.booleans())
def test_mux_survives_any_frame_sequence(seq, initiator):
    mux = fr.Mux(initiator, 65536, 65536, max_inbound=4)
    for frame in seq:
        try:
            raw = fr.encode_frame(frame)
            mux.receive(fr.decode_frame(raw))
        except RemoteProtocolError:
            return  # the session would be closed here
        assert mux.inbound <= 4
        assert all(s.recv_window >= 0 for s in mux.streams.values())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=10), st.lists(st.integers(1, 50), max_size=20))
def test_record_reader_reassembles_any_split(bodies, cuts):
    wire = b"".join(frame_record(b) for b in bodies)
    reader, out, pos = RecordReader(), [], 0
    for cut in [*cuts, len(wire)]:
        reader.feed(wire[pos:pos + cut])
        pos += cut
        while (rec := reader.next_record()) is not None:
            out.append(rec)
    reader.feed(wire[pos:])
    while (rec := reader.next_record()) is not None:
        out.append(rec)
    assert out == bodies


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_hello_decode_never_crashes(data):
    try:
        Hello.decode(data)
    except RemoteProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_handshake_responder_rejects_garbage_message_one(data):
    r = Handshake(False, X25519PrivateKey.generate(), PSK, Hello("r"))
    try:
        r.read_message(data)
    except RemoteProtocolError:
        return
    raise AssertionError("garbage passed the PSK check")


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_handshake_initiator_rejects_garbage_message_two(data):
    i = Handshake(True, X25519PrivateKey.generate(), PSK, Hello("i"))
    i.write_message()
    try:
        i.read_message(data)
    except RemoteProtocolError:
        return
    raise AssertionError("garbage message 2 accepted")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
control_fields = st.sampled_from(["id", "node", "addrs", "port", "nat", "mapped", "observed",
                                  "found", "key", "public", "online", "ok", "delay", "reason",
                                  "circuit", "from"])
control_ops = st.sampled_from([*control._PARSERS, "teleport"])


@settings(max_examples=1000, deadline=None)
@given(control_ops, st.dictionaries(control_fields, json_values, max_size=10))
def test_control_decode_raises_only_protocol_errors(op, fields):
    payload = json.dumps({"op": op, **fields}).encode()
    try:
        message = control.decode(payload)
    except RemoteProtocolError:
        return
    assert control.decode(control.encode(message)) == message


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_control_decode_of_any_bytes(data):
    try:
        control.decode(data)
    except RemoteProtocolError:
        pass
