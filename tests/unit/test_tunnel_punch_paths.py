"""Path bookkeeping in ``Peers`` and its ``SessionTable`` with stand-in sessions: draining,
dedupe, liveness, loss and upgrades."""
from __future__ import annotations

import itertools
import socket
import time
from types import SimpleNamespace
from typing import Any

from edgemesh.meta.store import Store
from edgemesh.tunnel import sessions as sessions_mod
from edgemesh.tunnel.peers import Peers

_clock = itertools.count()


class FakeSession:
    def __init__(self, peer: str, path: str, initiator: bool, address: str = "x:1") -> None:
        self.peer, self.path, self.initiator, self.address = peer, path, initiator, address
        self.closed = False
        self.close_reason = ""
        self.created = float(next(_clock))
        self.last_seen = time.monotonic()
        self.stream_count = 0
        self.mux = SimpleNamespace(goaway_received=False, goaway=lambda code, reason: reason)
        self.peer_hello = SimpleNamespace(role="agent", extra={"port": 20007})
        self.written: list[Any] = []
        self.sock = SimpleNamespace(setsockopt=lambda *a: None, fileno=lambda: -1)

    def write(self, *frames: Any) -> None:
        self.written += frames

    def close(self, reason: str = "") -> None:
        self.closed, self.close_reason = True, reason


def make(name: str) -> Peers:
    node = SimpleNamespace(name=name, listen_addr=("0.0.0.0", 20006))
    p = Peers(node, Store(), [], 20006, [], lambda *a, **k: None)  # type: ignore[arg-type]
    p._lost = lambda session: None  # type: ignore[method-assign]
    return p


def test_a_direct_session_drains_the_relayed_one() -> None:
    p = make("a1")
    relayed = FakeSession("b1", "relayed", True)
    punched = FakeSession("b1", "punched", True)
    p.add(relayed)  # type: ignore[arg-type]
    assert p.best("b1") is relayed and p.state("b1").next_at is not None  # upgrade scheduled
    p.add(punched)  # type: ignore[arg-type]
    assert p.best("b1") is punched and p.state("b1").next_at is None
    p.table.tidy("b1")
    assert relayed.written == ["upgraded to a direct path"]  # GOAWAY sent
    assert p.best("b1") is punched
    later = time.monotonic() + sessions_mod.RETIRE_GRACE + 1
    relayed.stream_count = 1  # still carrying a stream: not closed yet
    p.table.close_retired(later)
    assert not relayed.closed
    relayed.stream_count = 0
    p.table.close_retired(later)
    assert relayed.closed and relayed.close_reason == "retired"


def test_only_the_smaller_name_retires_duplicates_keeping_the_one_it_opened() -> None:
    small, large = make("a1"), make("b1")
    # the same two connections seen from both ends
    s_opened_by_a = FakeSession("b1", "direct", initiator=True)
    s_opened_by_b = FakeSession("b1", "direct", initiator=False)
    for s in (s_opened_by_a, s_opened_by_b):
        small.add(s)  # type: ignore[arg-type]
    small.table.tidy("b1")
    assert s_opened_by_b in small.table.retiring and s_opened_by_a not in small.table.retiring
    l_opened_by_a = FakeSession("a1", "direct", initiator=False)
    l_opened_by_b = FakeSession("a1", "direct", initiator=True)
    for s in (l_opened_by_a, l_opened_by_b):
        large.add(s)  # type: ignore[arg-type]
    large.table.tidy("a1")
    assert not large.table.retiring  # the larger name waits for the other side's GOAWAY


def test_a_silent_session_is_closed_without_time_wait_and_a_quiet_one_probed() -> None:
    dead, quiet = FakeSession("b1", "punched", True), FakeSession("c1", "direct", True)
    pinged: list[str] = []
    quiet.ping = lambda: pinged.append("ping")  # type: ignore[attr-defined]
    now = time.monotonic()
    rule = sessions_mod.AGENT_LIVENESS
    dead.last_seen = now - rule.dead_after - 0.1
    quiet.last_seen = now - rule.probe_after - 0.1
    rule.check([dead, quiet], now, sessions_mod.close_now)  # type: ignore[list-item]
    assert dead.closed and dead.close_reason.startswith("path silent for")
    assert not quiet.closed and pinged == ["ping"]


def test_a_session_whose_bytes_wait_unread_is_not_silent() -> None:
    """A busy loop (or back-pressure) leaves the peer's bytes in the socket: not a dead path."""
    rule = sessions_mod.AGENT_LIVENESS
    behind = FakeSession("b1", "direct", True)
    ours, theirs = socket.socketpair()
    theirs.sendall(b"pong")
    behind.sock = SimpleNamespace(setsockopt=lambda *a: None, fileno=ours.fileno)
    now = time.monotonic()
    behind.last_seen = now - rule.dead_after - 5
    rule.check([behind], now, sessions_mod.close_now)  # type: ignore[list-item]
    assert not behind.closed and behind.last_seen == now
    ours.recv(4)
    behind.last_seen = now - rule.dead_after - 5
    rule.check([behind], now, sessions_mod.close_now)  # type: ignore[list-item]
    assert behind.closed
    ours.close()
    theirs.close()


def test_losing_the_last_session_schedules_a_quick_reattempt() -> None:
    p = make("a1")
    lost: list[str] = []
    p._lost = lambda session: lost.append(session.peer)  # type: ignore[method-assign]
    punched = FakeSession("b1", "punched", True)
    p.add(punched)  # type: ignore[arg-type]
    punched.closed = True
    p.removed(punched)  # type: ignore[arg-type]
    assert lost == ["b1"]
    retired = FakeSession("b1", "relayed", True)
    p.add(retired)  # type: ignore[arg-type]
    p.table.retire(retired, "upgraded")  # type: ignore[arg-type]
    p.removed(retired)  # type: ignore[arg-type]
    assert lost == ["b1"]  # a session we retired on purpose is not a loss


def test_a_direct_peer_is_remembered_at_the_port_its_hello_names() -> None:
    p = make("a1")
    p.add(FakeSession("a2", "direct", False, address="192.168.10.3:41000"))  # type: ignore[arg-type]
    assert ("lan", "192.168.10.3", 20007) in p.candidates("a2")
