"""The tunnel's control codec (tunnel/control.py): the bytes earlier versions sent, every field
checked with an error naming it, unknown kinds rejected, and what a session does with each."""
from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemesh.errors import RemoteProtocolError
from edgemesh.meta.store import Store
from edgemesh.tunnel import control as c
from edgemesh.tunnel.session import SESSION_ERRORS, UNKNOWN_CONTROL
from tests.netlab import wait_for
from tests.unit.test_tunnel_session import agent, start_server

KEY = "ab" * 32

# the dicts the five modules built before the codec, in their key order
LEGACY: list[tuple[dict[str, Any], c.Message]] = [
    ({"op": "register", "addrs": ["192.168.1.2", "10.0.0.2"], "port": 20006,
      "nat": "port-preserving", "mapped": True},
     c.Register(("192.168.1.2", "10.0.0.2"), 20006, "port-preserving", True)),
    ({"op": "registered", "observed": "198.18.0.1:40000"}, c.Registered("198.18.0.1:40000")),
    ({"op": "lookup", "id": 3, "node": "edge-1"}, c.Lookup(3, "edge-1")),
    ({"op": "record", "id": 3, "found": True, "node": "edge-1", "key": KEY,
      "addrs": ["192.168.1.2"], "port": 20006, "public": "198.18.0.1:20006", "nat": "none",
      "online": True},
     c.Record(3, True, "edge-1", True, KEY, ("192.168.1.2",), 20006, "198.18.0.1:20006",
              "none")),
    ({"op": "record", "id": 4, "found": False, "node": "gone", "online": False},
     c.Record(4, False, "gone", False)),
    ({"op": "rendezvous", "id": 5, "node": "edge-2"}, c.Rendezvous(5, "edge-2")),
    ({"op": "punch", "ok": True, "node": "b1", "key": KEY, "public": "198.18.0.2:20006",
      "addrs": ["192.168.1.2"], "port": 20006, "nat": "port-preserving", "delay": 0.02,
      "id": 5},
     c.Punch(True, "b1", 5, KEY, "198.18.0.2:20006", ("192.168.1.2",), 20006,
             "port-preserving", 0.02)),
    ({"op": "punch", "ok": True, "node": "a1", "key": KEY, "public": "[2001:db8::1]:20006",
      "addrs": [], "port": 20006, "nat": "none", "delay": 0.0},
     c.Punch(True, "a1", None, KEY, "[2001:db8::1]:20006", (), 20006, "none", 0.0)),
    ({"op": "punch", "id": 6, "node": "x", "ok": False, "reason": "not registered here: x"},
     c.Punch(False, "x", 6, reason="not registered here: x")),
    ({"op": "incoming", "circuit": "0f" * 16, "from": "edge-1"}, c.Incoming("0f" * 16, "edge-1")),
    ({"op": "error", "id": 7, "reason": "this agent is not a relay"},
     c.Error(7, "this agent is not a relay")),
    ({"op": "error", "id": None, "reason": "unknown op 'x'"}, c.Error(None, "unknown op 'x'")),
]


@pytest.mark.parametrize(("legacy", "message"), LEGACY, ids=lambda v: getattr(v, "op", ""))
def test_encoding_is_the_bytes_earlier_versions_sent(legacy: dict, message: c.Message) -> None:
    wire = json.dumps(legacy, separators=(",", ":")).encode()
    assert c.encode(message) == wire
    assert c.decode(wire) == message


def test_the_circuit_answer_keeps_its_spaced_json() -> None:
    wire = json.dumps({"op": "circuit", "ok": False, "reason": "unknown circuit"}).encode()
    assert c.encode(c.Circuit(False, "unknown circuit")) == wire
    assert c.decode(wire) == c.Circuit(False, "unknown circuit")


@pytest.mark.parametrize(("obj", "error"), [
    ({"op": "record", "id": 1, "found": True, "node": "b", "port": 70000},
     "record.port: expected an integer 0-65535"),
    ({"op": "register", "addrs": "10.0.0.1", "port": 1}, "register.addrs: expected a list"),
    ({"op": "register", "addrs": [1], "port": 1}, "register.addrs: expected a list"),
    ({"op": "register", "addrs": [], "port": True}, "register.port: expected an integer"),
    ({"op": "register", "addrs": [], "port": 1, "mapped": "yes"}, "register.mapped: expected"),
    ({"op": "lookup", "id": "3", "node": "b"}, "lookup.id: expected an integer"),
    ({"op": "lookup", "id": -1, "node": "b"}, "lookup.id: expected an integer"),
    ({"op": "lookup", "id": 1, "node": ""}, "lookup.node: expected a string of 1-253"),
    ({"op": "lookup", "id": 1, "node": "n" * 254}, "lookup.node: expected a string of 1-253"),
    ({"op": "rendezvous", "id": 1}, "rendezvous.node: expected"),
    ({"op": "punch", "ok": True, "node": "b", "public": "1.2.3.4"}, "punch.public: expected"),
    ({"op": "punch", "ok": True, "node": "b", "public": "1.2.3.4:0"}, "punch.public"),
    ({"op": "punch", "ok": True, "node": "b", "public": "h:1", "delay": 3600}, "punch.delay"),
    ({"op": "punch", "ok": True, "node": "b", "public": "h:1", "key": "zz"}, "punch.key"),
    ({"op": "punch", "ok": 1, "node": "b"}, "punch.ok: expected true or false"),
    ({"op": "incoming", "circuit": "", "from": "a"}, "incoming.circuit"),
    ({"op": "incoming", "circuit": "t"}, "incoming.from"),
    ({"op": "circuit", "reason": "x"}, "circuit.ok"),
    ({"op": "registered", "observed": ["x"]}, "registered.observed"),
])
def test_every_field_is_checked_and_named(obj: dict, error: str) -> None:
    with pytest.raises(RemoteProtocolError, match=error.replace("(", r"\(")):
        c.decode(json.dumps(obj).encode())


@pytest.mark.parametrize(("payload", "error"), [
    (b"not json", "not JSON"),
    (b"\xff\xfe\x00", "not JSON"),
    (b"[1]", "without op"),
    (b'{"op": 3}', "without op"),
    (b"[" * 29000 + b"]" * 29000, "not JSON"),  # RecursionError inside json
    (b'{"op": "x", "pad": "' + b"a" * 60000 + b'"}', "at most 60000"),
    (b'{"op": "lookup", "id": 1' + b"1" * 5000 + b', "node": "b"}', "not JSON"),
])
def test_malformed_payloads_are_protocol_errors(payload: bytes, error: str) -> None:
    with pytest.raises(RemoteProtocolError, match=error):
        c.decode(payload)


def test_unknown_kinds_are_rejected_with_their_id_and_unknown_fields_ignored() -> None:
    with pytest.raises(c.UnknownKind) as e:
        c.decode(b'{"op": "teleport", "id": 9}')
    assert (e.value.op, e.value.id) == ("teleport", 9)
    newer = b'{"op": "lookup", "id": 1, "node": "b", "hint": {"v": 2}}'
    assert c.decode(newer) == c.Lookup(1, "b")


names = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=20)
texts = st.text(max_size=40)
ids = st.integers(0, c.MAX_ID)
ports = st.integers(0, 65535)
addrs = st.lists(texts.filter(bool), max_size=5).map(tuple)
keys = st.one_of(st.just(""), st.binary(min_size=32, max_size=32).map(bytes.hex))
publics = st.tuples(st.sampled_from(["198.18.0.1", "[::1]", "h"]), st.integers(1, 65535)).map(
    lambda hp: f"{hp[0]}:{hp[1]}")
delays = st.integers(0, 10000).map(lambda i: i / 10000)
messages = st.one_of(
    st.builds(c.Register, addrs, ports, st.text(max_size=32), st.booleans()),
    st.builds(c.Registered, texts),
    st.builds(c.Lookup, ids, names),
    st.builds(c.Rendezvous, ids, names),
    st.builds(c.Record, st.none() | ids, st.just(False), names, st.booleans()),
    st.builds(c.Record, st.none() | ids, st.just(True), names, st.booleans(), keys, addrs,
              ports, texts, st.text(max_size=32)),
    st.builds(lambda n, i, r: c.Punch(False, n, i, reason=r), names, st.none() | ids, texts),
    st.builds(c.Punch, st.just(True), names, st.none() | ids, keys, publics, addrs, ports,
              st.text(max_size=32), delays),
    st.builds(c.Incoming, st.text(min_size=1, max_size=64), names),
    st.builds(c.Circuit, st.booleans(), texts),
    st.builds(c.Error, st.none() | ids, texts),
)


@settings(max_examples=500, deadline=None)
@given(messages)
def test_every_valid_message_round_trips(message: c.Message) -> None:
    assert c.decode(c.encode(message)) == message


def test_a_session_answers_unknown_kinds_and_closes_on_malformed_ones(tmp_path) -> None:
    server, addr = start_server(tmp_path)
    a = agent(tmp_path, "a", Store(), servers=[addr])
    got: list[c.Message] = []
    handled = a.peers.servers.on_control
    a.peers.servers.on_control = lambda s, m: got.append(m) or handled(s, m)  # type: ignore[method-assign]
    unknown, broken = UNKNOWN_CONTROL.value, SESSION_ERRORS.labels("RemoteProtocolError").value
    try:
        wait_for(lambda: a.check() == "" and server.sessions, 10, what="the link")
        link = a.peers.links[0].session
        assert link is not None
        link.write(link.mux.control(b'{"op": "teleport", "id": 42}'))
        wait_for(lambda: c.Error(42, "unknown op 'teleport'") in got, 5, what="the answer")
        assert UNKNOWN_CONTROL.value == unknown + 1 and not link.closed
        link.write(link.mux.control(b'{"op": "lookup", "id": "x", "node": "b"}'))
        wait_for(lambda: link.closed, 5, what="the session closed")
        assert SESSION_ERRORS.labels("RemoteProtocolError").value == broken + 1
    finally:
        a.stop()
        server.stop()
