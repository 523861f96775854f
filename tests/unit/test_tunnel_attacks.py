"""A member sending malformed or oversized tunnel bytes: the server closes that session with
a reason naming the fault, counts it, and keeps serving (the agent's next link registers).
An eavesdropper replaying a member's handshake gets nothing."""
from __future__ import annotations

import socket

import pytest

from edgemesh.config import split_host_port
from edgemesh.meta.store import Store
from edgemesh.tunnel import frames as fr
from edgemesh.tunnel.handshake import Handshake, Hello
from edgemesh.tunnel.node import HANDSHAKES
from edgemesh.tunnel.records import frame_record
from edgemesh.tunnel.session import SESSION_ERRORS
from edgemesh.tunnel.x25519 import StaticKey
from tests.netlab import wait_for
from tests.unit.test_tunnel_session import agent, start_server

H = fr.HEADER.pack
CASES = {
    "unencrypted record": (None, "authentication tag mismatch"),
    "unknown frame type": (H(99, 0, 0), "unknown frame type 99"),
    "oversized PING": (H(fr.FrameType.PING, 0, 0) + b"p" * 100, "PING payload of 100 bytes"),
    "DATA on a stream never opened": (H(fr.FrameType.DATA, 0, 7) + b"x", "never opened"),
    "oversized control message": (H(fr.FrameType.CONTROL, 0, 0) + b'{"op":"x","p":"'
                                  + b"a" * 60100 + b'"}', "control message of"),
    "deeply nested control message": (H(fr.FrameType.CONTROL, 0, 0) + b"[" * 20000
                                      + b"]" * 20000, "not JSON"),
    "control field out of range": (H(fr.FrameType.CONTROL, 0, 0)
                                   + b'{"op":"lookup","id":1,"node":""}', "lookup.node"),
}


@pytest.mark.parametrize("case", CASES)
def test_malformed_bytes_close_the_session_and_are_counted(tmp_path, case: str) -> None:
    raw, reason = CASES[case]
    server, addr = start_server(tmp_path)
    a = agent(tmp_path, "a", Store(), servers=[addr])
    errors = SESSION_ERRORS.labels("HandshakeFailed" if raw is None else "RemoteProtocolError")
    before = errors.value
    try:
        wait_for(lambda: "a" in server.relay.registry, 10, what="registration")
        victim = server.relay.registry["a"].session
        link = a.peers.links[0].session
        assert link is not None
        if raw is None:
            link.sock.sendall(frame_record(b"\x00" * 40))  # not sealed: the tag fails
        else:
            link._queue(link.channel.seal(raw))
            link.flush()
        wait_for(lambda: victim.closed, 10, what="the session closed")
        assert reason in victim.close_reason
        assert errors.value == before + 1
        # the server keeps serving: the agent's link comes back and registers again
        wait_for(lambda: "a" in server.relay.registry
                 and server.relay.registry["a"].session is not victim, 15, what="re-register")
    finally:
        a.stop()
        server.stop()


def read_one_record(sock: socket.socket) -> bytes:
    head = sock.recv(2, socket.MSG_WAITALL)
    return sock.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)


def test_a_replayed_handshake_is_refused_and_the_genuine_session_stays(tmp_path) -> None:
    server, addr = start_server(tmp_path)
    host, port = split_host_port(addr)
    failed = HANDSHAKES.labels("in", "failed")
    try:
        genuine = Handshake(True, StaticKey.generate(), server.node.psk, Hello("a1"))
        first = socket.create_connection((host, port), timeout=5)
        m1 = genuine.write_message()
        first.sendall(frame_record(m1))
        genuine.read_message(read_one_record(first))
        m3 = genuine.write_message()
        first.sendall(frame_record(m3))
        wait_for(lambda: len(server.sessions) == 1, 5, what="the genuine session")
        before = failed.value
        # an eavesdropper replays the initiator's two messages on a new connection: the
        # server's fresh ephemeral key makes message 3 undecryptable
        replay = socket.create_connection((host, port), timeout=5)
        replay.sendall(frame_record(m1))
        assert read_one_record(replay)  # message 2, for keys the eavesdropper cannot derive
        replay.sendall(frame_record(m3))
        assert replay.recv(1) == b""  # closed without a word
        assert failed.value == before + 1
        assert len(server.sessions) == 1 and not next(iter(server.sessions)).closed
        replay.close()
        first.close()
    finally:
        server.stop()
