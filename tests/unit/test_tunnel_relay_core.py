"""RelayCore's circuit bookkeeping, on real sockets: a circuit token is good for one accept."""
from __future__ import annotations

import json
import socket
from types import SimpleNamespace

from edgemesh.tunnel import frames as fr
from edgemesh.tunnel.relay import RelayCore, _Pending


class PlainChannel:
    """Stands in for SecureChannel: seals nothing, so the test can read the answer frame."""

    def seal(self, data: bytes) -> bytes:
        return bytes(data)


def accepted(node: str, sock: socket.socket) -> SimpleNamespace:
    return SimpleNamespace(sock=sock, result=SimpleNamespace(remote_hello=SimpleNamespace(
        node=node)), reader=SimpleNamespace(leftover=lambda: b""))


def answer(peer: socket.socket) -> dict:
    peer.settimeout(5)
    frame = fr.decode_frame(peer.recv(65536))
    assert frame.type == fr.FrameType.CONTROL
    return json.loads(frame.payload)


def test_a_circuit_token_is_good_for_one_accept() -> None:
    core = RelayCore(bytes_per_second=10**9, max_circuits=4)
    pending = core._pending["tok"] = _Pending("a1", "b1")
    first, first_peer = socket.socketpair()
    core._accept(accepted("b1", first), PlainChannel(), "tok")
    assert pending.arrived.ready() and pending.arrived.get()[0] is first
    assert "tok" not in core._pending

    replay, replay_peer = socket.socketpair()
    core._accept(accepted("b1", replay), PlainChannel(), "tok")
    assert answer(replay_peer) == {"op": "circuit", "ok": False, "reason": "unknown circuit"}
    assert replay.fileno() == -1  # closed; the waiting first socket was not replaced
    assert pending.arrived.get()[0] is first and first.fileno() != -1
    for s in (first, first_peer, replay_peer):
        s.close()


def test_only_the_named_target_may_accept() -> None:
    core = RelayCore(bytes_per_second=10**9, max_circuits=4)
    pending = core._pending["tok"] = _Pending("a1", "b1")
    intruder, intruder_peer = socket.socketpair()
    core._accept(accepted("c9", intruder), PlainChannel(), "tok")
    assert answer(intruder_peer)["reason"] == "unknown circuit"
    assert not pending.arrived.ready() and "tok" in core._pending  # b1 can still accept
    intruder_peer.close()
