"""RelayCore's circuit bookkeeping, on real sockets: a circuit token is good for one accept;
caps (relay-wide circuits, server sessions) refuse and count; idle circuits are closed."""
from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import gevent
import pytest

from edgemesh.runtime import metrics
from edgemesh.server.main import Server
from edgemesh.tunnel import frames as fr
from edgemesh.tunnel.relay import FairShare, RelayCore, _Pending


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


def counter(name: str, *labels: str) -> float:
    metric = metrics.REGISTRY.get(name)
    assert metric is not None
    return (metric.labels(*labels) if labels else metric).value  # type: ignore[attr-defined]


def registered(*nodes: str) -> dict:
    return {n: SimpleNamespace(session=SimpleNamespace(closed=False)) for n in nodes}


def test_circuits_beyond_the_relay_wide_cap_are_refused_and_counted() -> None:
    core = RelayCore(bytes_per_second=10**9, max_circuits=4, max_total=2)
    core.registry = registered("a1", "b1")
    core.total = 2  # held by other members: a1 itself holds none
    before = counter("edgemesh_relay_circuits_total", "relay_full")
    mine, peer = socket.socketpair()
    core._connect(accepted("a1", mine), PlainChannel(), "b1")
    assert answer(peer) == {"op": "circuit", "ok": False, "reason": "relay full: 2 circuits"}
    assert mine.fileno() == -1 and core.circuits.get("a1", 0) == 0 and core.total == 2
    assert counter("edgemesh_relay_circuits_total", "relay_full") == before + 1
    peer.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        one = socket.create_connection(srv.getsockname())
        return one, srv.accept()[0]


def test_an_idle_circuit_is_closed_and_a_busy_one_is_not() -> None:
    core = RelayCore(bytes_per_second=10**9, max_circuits=4, idle_timeout=0.4)
    (a, a_peer), (b, b_peer) = tcp_pair(), tcp_pair()
    before = counter("edgemesh_relay_idle_circuits_closed_total")
    splicing = gevent.spawn(core._splice, a, b"", "a1", b, b"", "b1")
    b_peer.settimeout(5)
    for _ in range(8):  # 0.8 s of traffic, twice the idle timeout: kept
        a_peer.sendall(b"x")
        assert b_peer.recv(16) == b"x"
        gevent.sleep(0.1)
    assert len(core.live) == 1 and not splicing.ready()
    splicing.join(timeout=3)  # silence: closed within the timeout and a sweep
    assert splicing.ready() and not core.live
    assert b_peer.recv(16) == b"" and a.fileno() == -1 and b.fileno() == -1
    assert counter("edgemesh_relay_idle_circuits_closed_total") == before + 1
    core.stop()
    for s in (a_peer, b_peer):
        s.close()


def test_sessions_beyond_max_sessions_are_refused_and_counted() -> None:
    server = Server.__new__(Server)
    server.sessions, server.max_sessions = {object()}, 1  # type: ignore[assignment]
    before = counter("edgemesh_server_sessions_refused_total")
    mine, peer = socket.socketpair()
    server._on_accept(SimpleNamespace(sock=mine, address="192.0.2.9:20006",  # type: ignore
                                      result=SimpleNamespace(remote_hello=SimpleNamespace(
                                          intent="session", node="n9"))))
    assert mine.fileno() == -1 and len(server.sessions) == 1
    assert counter("edgemesh_server_sessions_refused_total") == before + 1
    peer.close()


def test_fair_share_keeps_a_small_flow_out_of_a_bulk_flow_s_debt() -> None:
    share = FairShare(1000.0)
    bulk, small = object(), object()
    assert share.take(bulk, 1000, 0.0) == 0.0  # alone: the whole rate and burst
    assert share.take(bulk, 1000, 0.0) == pytest.approx(1.0)  # 1000 bytes of debt: 1 s
    assert share.take(small, 10, 0.1) == 0.0  # not behind the bulk flow's debt
    # two active flows: each gets half, so the member's total stays within the rate
    assert share.take(bulk, 500, 0.2) == pytest.approx(2.8)  # (1000 - 100 + 500) / 500
    share.remove(small)
    share.remove(bulk)
    assert not share.flows
