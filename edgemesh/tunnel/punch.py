"""Sans-IO hole-punching coordination: NAT classification, the punch decision, offers, roles,
and the per-peer record of path attempts that ``edgemesh status`` shows.

Nothing here does I/O; ``peers`` (agent) and ``relay`` (server) are the shells.

- An agent learns its public mapping from every server it registers with (``registered
  observed``). The same inner port seen under different public ports by two servers, or by
  one server across consecutive registrations, means a symmetric NAT (``--random-fully``): punching
  cannot work, a relay is needed. A public port equal to the local port means a
  port-preserving NAT (Linux MASQUERADE), the punchable kind.
- A server answering ``rendezvous`` sends both agents a ``punch`` offer at once: each connects
  from its tunnel port to the other's public address (TCP simultaneous open). Neither side is
  "the listener", so the Noise roles come from the names: the smaller name initiates.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from edgemesh.tunnel import control

MAX_ATTEMPTS_KEPT = 12
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0
PAIR_COOLDOWN = 2.0  # a server coordinates one punch per pair at most this often
MAX_DELAY = control.MAX_DELAY


class NatKind(enum.StrEnum):
    NONE = "none"  # the public address is one of our own
    PRESERVING = "port-preserving"  # MASQUERADE: same public port for every destination
    CHANGING = "port-changing"  # one observation, another port: not known yet
    SYMMETRIC = "symmetric"  # a new public port per destination: not punchable
    UNKNOWN = "unknown"


def split(addr: str) -> tuple[str, int] | None:
    """"IP:PORT" (or "[v6]:PORT") → (ip, port); None when malformed."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    value = int(port)
    return (host, value) if 0 < value < 65536 else None


def classify_nat(local_ips: list[str], local_port: int, observed: list[str],
                 earlier: list[str]) -> NatKind:
    """What our NAT does, from the public addresses servers saw for our tunnel port.

    ``observed``: each server link's current observation; ``earlier``: the previous
    observation of links that registered again (a reconnection gets a new mapping). Current
    evidence of port preservation wins over history: a router may change its NAT mode.
    """
    points = [p for p in (split(o) for o in observed) if p is not None]
    if not points:
        return NatKind.UNKNOWN
    if all(ip in local_ips for ip, _ in points):
        return NatKind.NONE
    ports = {port for _, port in points}
    if ports == {local_port}:
        return NatKind.PRESERVING
    ports |= {p[1] for p in (split(o) for o in earlier) if p is not None}
    return NatKind.SYMMETRIC if len(ports) > 1 else NatKind.CHANGING


def skip_reason(me_nat: str, my_public: str, peer_nat: str, peer_public: str) -> str:
    """Why a punch cannot work between us and the peer; "" when it is worth trying."""
    if not peer_public or split(peer_public) is None:
        return "peer has no public address known to a server"
    if peer_nat == NatKind.SYMMETRIC:
        return "peer behind a symmetric NAT"
    if me_nat == NatKind.SYMMETRIC:
        return "this node is behind a symmetric NAT"
    mine = split(my_public)
    if mine is not None and mine[0] == split(peer_public)[0]:  # type: ignore[index]
        return "same public address as the peer (one NAT, no hairpin): LAN addresses only"
    return ""


def is_initiator(me: str, peer: str) -> bool:
    """Noise role on a punched connection (neither side listened): the smaller name starts."""
    return me < peer


@dataclass(frozen=True)
class Party:
    """What a server knows of one side of a punch."""
    node: str
    key: str
    public: str
    addrs: tuple[str, ...]
    port: int
    nat: str
    rtt: float | None


def offers(a: Party, b: Party, rid: int | None) -> tuple[control.Punch, control.Punch]:
    """The ``punch`` messages for A (who asked, ``rid``) and B, timed to leave together.

    The side with the shorter path to the server waits half the difference, so both SYNs
    leave at about the same moment (drop-mode NATs tolerate a second or more of skew anyway).
    """
    ra, rb = a.rtt or 0.0, b.rtt or 0.0
    delay_a = min(MAX_DELAY, max(0.0, (rb - ra) / 2))
    delay_b = min(MAX_DELAY, max(0.0, (ra - rb) / 2))

    def offer(to_peer: Party, delay: float, asker: int | None) -> control.Punch:
        return control.Punch(True, to_peer.node, asker, to_peer.key, to_peer.public,
                             to_peer.addrs, to_peer.port, to_peer.nat, round(delay, 4))
    return offer(b, delay_a, rid), offer(a, delay_b, None)


@dataclass(frozen=True)
class Offer:
    """A usable ``punch`` offer received by an agent."""
    node: str
    key: str
    host: str
    port: int
    nat: str
    delay: float


def parse_offer(msg: control.Punch) -> Offer | str:
    """An ``Offer``, or the reason the message is not a usable one (refusals included)."""
    if not msg.ok:
        return msg.reason or "server refused to coordinate"
    where = split(msg.public)
    if where is None:
        return "malformed punch offer: public address"
    return Offer(msg.node, msg.key, where[0], where[1], msg.nat, msg.delay)


class PairCooldown:
    """Server side: when both nodes of a pair ask within PAIR_COOLDOWN, the second request
    is answered by the offer already sent (both sides already got one). A node asking again
    itself is a new attempt, and is not held back. Keys name sessions, not only nodes: a
    restarted agent is a new party."""

    def __init__(self, cooldown: float = PAIR_COOLDOWN, limit: int = 4096) -> None:
        self.cooldown = cooldown
        self.limit = limit
        self._last: dict[tuple[str, str], float] = {}

    def allow(self, asker: str, target: str, now: float) -> bool:
        if now - self._last.get((target, asker), -1e9) < self.cooldown:
            return False
        if len(self._last) >= self.limit:
            self._last = {p: t for p, t in self._last.items() if now - t < self.cooldown}
        self._last[(asker, target)] = now
        return True


# ---- what status shows -----------------------------------------------------------------------

@dataclass(frozen=True)
class Attempt:
    path: str  # lan | node | public | punch-tcp | relay:<addr>
    ok: bool
    reason: str
    at: float  # wall clock

    def view(self) -> dict[str, Any]:
        return {"path": self.path, "result": "ok" if self.ok else "failed",
                "reason": self.reason, "at": round(self.at, 3)}


@dataclass
class PathState:
    """One peer's path history and the schedule of its next upgrade attempt (monotonic time)."""
    attempts: deque[Attempt] = field(default_factory=lambda: deque(maxlen=MAX_ATTEMPTS_KEPT))
    backoff: float = FIRST_BACKOFF
    next_at: float | None = None
    punch_skip: str = ""  # why punching was not tried last time
    lost: str = ""  # why the last direct path ended

    def tried(self, path: str, ok: bool, reason: str, wall: float) -> None:
        self.attempts.append(Attempt(path, ok, reason, wall))

    def upgrade_failed(self, now: float) -> None:
        """A round without a direct path: retry after the backoff, doubling it."""
        self.next_at = now + self.backoff
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)

    def went_direct(self) -> None:
        self.backoff, self.next_at, self.lost = FIRST_BACKOFF, None, ""

    def path_lost(self, now: float, reason: str) -> None:
        """A direct path died: punch again soon (the mapping may come back at once)."""
        self.lost = reason
        self.backoff = FIRST_BACKOFF
        self.next_at = now + FIRST_BACKOFF

    def next_in(self, now: float) -> float | None:
        return None if self.next_at is None else round(max(0.0, self.next_at - now), 1)

    def detail(self, path: str) -> str:
        """A sentence a user can act on, for the path currently in use."""
        if path in ("direct", "punched"):
            return "hole punched" if path == "punched" else ""
        if path != "relayed":
            return ""
        if self.punch_skip:
            return f"{self.punch_skip}: relayed"
        if self.lost:
            return f"direct path lost ({self.lost}): relayed"
        failure = next((a for a in reversed(self.attempts)
                        if not a.ok and a.path == "punch-tcp"), None)
        if failure is not None:
            return f"hole punching failed ({failure.reason}): relayed"
        return "no direct path: relayed"
