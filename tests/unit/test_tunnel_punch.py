"""Sans-IO hole-punch coordination: NAT classification, decisions, offers, path history."""
from __future__ import annotations

import pytest

from edgemesh.tunnel import control, punch
from edgemesh.tunnel.punch import NatKind

LOCAL = ["192.168.10.2"]


@pytest.mark.parametrize(("observed", "earlier", "kind"), [
    ([], [], NatKind.UNKNOWN),
    (["192.168.10.2:20006"], [], NatKind.NONE),  # no NAT: the server sees our own address
    (["198.18.0.1:20006", "198.18.0.1:20006"], [], NatKind.PRESERVING),
    (["198.18.0.1:20006", "198.18.0.1:41000"], [], NatKind.SYMMETRIC),  # two servers disagree
    (["198.18.0.1:41000"], [], NatKind.CHANGING),  # one observation, another port
    (["198.18.0.1:41000"], ["198.18.0.1:52000"], NatKind.SYMMETRIC),  # re-registration moved
    # current evidence of preservation wins over history (the router's mode changed back)
    (["198.18.0.1:20006", "198.18.0.1:20006"], ["198.18.0.1:52000"], NatKind.PRESERVING),
    (["garbage", "198.18.0.1:20006"], [], NatKind.PRESERVING),
])
def test_classify_nat(observed: list[str], earlier: list[str], kind: NatKind) -> None:
    assert punch.classify_nat(LOCAL, 20006, observed, earlier) is kind


@pytest.mark.parametrize(("me", "mine", "peer", "theirs", "needle"), [
    ("port-preserving", "198.18.0.1:20006", "port-preserving", "198.18.0.2:20006", ""),
    ("port-preserving", "198.18.0.1:20006", "symmetric", "198.18.0.2:4242",
     "peer behind a symmetric NAT"),
    ("symmetric", "198.18.0.1:999", "port-preserving", "198.18.0.2:20006",
     "this node is behind a symmetric NAT"),
    ("port-preserving", "198.18.0.1:20006", "port-preserving", "198.18.0.1:20007",
     "same public address"),
    ("unknown", "", "unknown", "", "no public address"),
    ("unknown", "", "unknown", "not an address", "no public address"),
    ("unknown", "", "unknown", "198.18.0.2:20006", ""),  # unknown NATs are worth one try
])
def test_skip_reason(me: str, mine: str, peer: str, theirs: str, needle: str) -> None:
    reason = punch.skip_reason(me, mine, peer, theirs)
    assert (needle in reason) if needle else reason == ""


def test_roles_are_complementary_and_deterministic() -> None:
    assert punch.is_initiator("a1", "b1") and not punch.is_initiator("b1", "a1")


def party(node: str, public: str, rtt: float | None) -> punch.Party:
    return punch.Party(node, "ab" * 32, public, ("192.168.1.2",), 20006, "port-preserving", rtt)


def test_offers_name_the_other_side_and_time_the_faster_one_to_wait() -> None:
    a, b = party("a1", "198.18.0.1:20006", 0.010), party("b1", "198.18.0.2:20006", 0.050)
    to_a, to_b = punch.offers(a, b, 7)
    assert to_a.node == "b1" and to_a.public == "198.18.0.2:20006" and to_a.id == 7
    assert to_b.node == "a1" and to_b.public == "198.18.0.1:20006" and to_b.id is None
    # a is 40 ms closer to the server: it waits half the difference so both SYNs leave together
    assert to_a.delay == pytest.approx(0.020) and to_b.delay == 0
    offer = punch.parse_offer(to_a)
    assert isinstance(offer, punch.Offer)
    assert (offer.node, offer.host, offer.port, offer.key) == ("b1", "198.18.0.2", 20006,
                                                               "ab" * 32)


def test_offer_delays_are_bounded() -> None:
    to_a, _ = punch.offers(party("a", "1.2.3.4:5", None), party("b", "1.2.3.5:5", 30.0), 1)
    assert to_a.delay == punch.MAX_DELAY


@pytest.mark.parametrize(("msg", "reason"), [
    (control.Punch(False, "b1", 3, reason="not registered here: b1"), "not registered"),
    (control.Punch(False, "b1", 3), "refused to coordinate"),
    (control.Punch(True, "b", public="1.2.3.4"), "public address"),
    (control.Punch(True, "b", public="1.2.3.4:0"), "public address"),
])
def test_bad_offers_are_refused_with_a_reason(msg: control.Punch, reason: str) -> None:
    got = punch.parse_offer(msg)
    assert isinstance(got, str) and reason in got


def test_an_offer_to_a_v6_address() -> None:
    offer = punch.parse_offer(control.Punch(True, "b", public="[::1]:7", delay=0.5))
    assert isinstance(offer, punch.Offer) and (offer.host, offer.port, offer.delay) == (
        "::1", 7, 0.5)


def test_pair_cooldown_coalesces_both_sides_asking() -> None:
    cd = punch.PairCooldown(cooldown=2.0, limit=2)
    assert cd.allow("a", "b", 0.0)
    assert not cd.allow("b", "a", 1.0)  # the other side asking too: the offer already went
    assert cd.allow("a", "b", 1.5)  # the same side asking again: a new attempt
    assert cd.allow("b", "a", 4.0)
    assert cd.allow("x", "y", 10.0) and len(cd._last) <= 2  # bounded


def test_path_state_backoff_doubles_and_resets() -> None:
    st_ = punch.PathState()
    st_.upgrade_failed(100.0)
    assert st_.next_in(100.0) == punch.FIRST_BACKOFF
    for _ in range(20):
        st_.upgrade_failed(100.0)
    assert st_.next_in(100.0) == punch.MAX_BACKOFF
    st_.path_lost(200.0, "path silent for 3.0s")
    assert st_.next_in(200.0) == punch.FIRST_BACKOFF
    assert "direct path lost (path silent" in st_.detail("relayed")
    st_.went_direct()
    assert st_.next_at is None and st_.detail("punched") == "hole punched"


def test_path_state_detail_says_why_a_peer_is_relayed() -> None:
    st_ = punch.PathState()
    assert st_.detail("relayed") == "no direct path: relayed"
    st_.tried("punch-tcp", False, "no answer from 198.18.0.2:20006 in 3s", 1.0)
    assert st_.detail("relayed").startswith("hole punching failed (no answer")
    st_.punch_skip = "peer behind a symmetric NAT"
    assert st_.detail("relayed") == "peer behind a symmetric NAT: relayed"
    for i in range(punch.MAX_ATTEMPTS_KEPT + 5):
        st_.tried("lan", False, "unreachable", float(i))
    assert len(st_.attempts) == punch.MAX_ATTEMPTS_KEPT  # bounded
    view = st_.attempts[-1].view()
    assert view == {"path": "lan", "result": "failed", "reason": "unreachable",
                    "at": float(punch.MAX_ATTEMPTS_KEPT + 4)}


def test_status_text_shows_why_and_when_next() -> None:
    from edgemesh.status import render
    peer = {"node": "b1", "path": "relayed", "address": "via 198.18.0.10:20004", "rtt_ms": 1.5,
            "detail": "peer behind a symmetric NAT: relayed", "next_attempt_in": 8.0,
            "attempts": [{"path": "lan", "result": "failed", "reason": "unreachable", "at": 1},
                         {"path": "punch-tcp", "result": "failed",
                          "reason": "peer behind a symmetric NAT", "at": 2},
                         {"path": "relay:198.18.0.10:20004", "result": "ok", "reason": "",
                          "at": 3}]}
    text = render({"node": {"node": "a1", "synced": True}, "peers": [peer]})
    assert "peer behind a symmetric NAT: relayed (next direct attempt in 8s)" in text
    assert "tried punch-tcp failed: peer behind a symmetric NAT" in text
    assert "tried relay:198.18.0.10:20004 ok" in text
