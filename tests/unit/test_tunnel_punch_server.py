"""The server's side of punching, with fake sessions: who gets which offer, and refusals."""
from __future__ import annotations

from typing import Any

from edgemesh.tunnel import control
from edgemesh.tunnel.relay import RelayCore


class FakeSession:
    def __init__(self, peer: str, address: str, rtt: float | None = None) -> None:
        self.peer, self.address, self.rtt = peer, address, rtt
        self.peer_key = bytes([len(peer)]) * 32
        self.closed = False
        self.sent: list[dict[str, Any]] = []

    def send_control(self, msg: control.Message) -> None:
        self.sent.append(control.to_dict(msg))


def registered(core: RelayCore, name: str, address: str, **extra: Any) -> FakeSession:
    s = FakeSession(name, address)
    fields: dict[str, Any] = {"nat": "port-preserving", **extra}
    core.on_control(s, control.Register(("192.168.1.2",), 20006, **fields))  # type: ignore[arg-type]
    s.sent.clear()
    return s


def test_rendezvous_sends_both_sides_an_offer_naming_the_other() -> None:
    core = RelayCore(1_000_000, 4)
    a = registered(core, "a1", "198.18.0.1:20006")
    b = registered(core, "b1", "198.18.0.2:20006")
    assert core.on_control(a, control.Rendezvous(5, "b1"))  # type: ignore[arg-type]
    assert a.sent == [{"op": "punch", "ok": True, "node": "b1", "key": b.peer_key.hex(),
                       "public": "198.18.0.2:20006", "addrs": ["192.168.1.2"], "port": 20006,
                       "nat": "port-preserving", "delay": 0.0, "id": 5}]
    assert b.sent[0]["node"] == "a1" and b.sent[0]["public"] == "198.18.0.1:20006"
    # the peer asking at the same moment is coalesced into the offer already sent
    assert core.on_control(b, control.Rendezvous(9, "a1"))  # type: ignore[arg-type]
    assert len(a.sent) == 1 and len(b.sent) == 1


def test_rendezvous_refusals_say_why() -> None:
    core = RelayCore(1_000_000, 4)
    a = registered(core, "a1", "198.18.0.1:20006")
    stranger = FakeSession("x", "198.18.0.9:1")
    core.on_control(stranger, control.Rendezvous(1, "a1"))  # type: ignore[arg-type]
    assert stranger.sent[-1]["ok"] is False and stranger.sent[-1]["reason"] == "register first"
    core.on_control(a, control.Rendezvous(2, "nobody"))  # type: ignore[arg-type]
    assert "not registered here" in a.sent[-1]["reason"] and a.sent[-1]["id"] == 2
    registered(core, "c1", "198.18.0.3:40000", mapped=False)
    core.on_control(a, control.Rendezvous(3, "c1"))  # type: ignore[arg-type]
    assert "not from its tunnel port" in a.sent[-1]["reason"]


def test_registration_keeps_the_nat_kind_and_rejects_unknown_values() -> None:
    core = RelayCore(1_000_000, 4)
    registered(core, "a1", "198.18.0.1:20006")
    registered(core, "b1", "198.18.0.2:1", nat="full-cone-please")
    kinds = {r["node"]: r["nat"] for r in core.records()}
    assert kinds == {"a1": "port-preserving", "b1": "unknown"}
