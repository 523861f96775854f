"""The sessions to each peer, and the one liveness rule agents and servers share.

``SessionTable`` keeps every session by peer name and decides, from the sessions alone, which
one carries new streams (``best``: direct or punched before relayed, newest first), which ones
drain (``retire``: GOAWAY, closed once idle) and which duplicate of a pair stays (the side
with the smaller name decides, so both ends agree). Path choice is not here: ``peers``.
"""
from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from edgemesh.errors import EdgeMeshError
from edgemesh.runtime.pump import LINGER_RST
from edgemesh.tunnel import punch
from edgemesh.tunnel.session import Session
from edgemesh.tunnel.stream import readable_bytes

log = logging.getLogger(__name__)

RETIRE_GRACE = 1.0  # a retired session closes once idle, not before this


def close_now(session: Session, reason: str) -> None:
    """Close with RST, leaving no TIME_WAIT: the same 4-tuple (tunnel port to a server, or
    to a peer's public address) must be usable again at once, to re-register or re-punch."""
    try:
        session.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    except OSError:
        pass
    session.close(reason)


@dataclass(frozen=True)
class Liveness:
    """Silence on a session that should be alive: ping it after ``probe_after`` seconds,
    close it after ``dead_after`` (a lost NAT mapping shows as silence, not as an error)."""
    probe_after: float
    dead_after: float

    def check(self, sessions: Iterable[Session], now: float,
              close: Callable[[Session, str], None]) -> None:
        for session in sessions:
            if session.closed:
                continue
            silent = now - session.last_seen
            if silent > self.probe_after and readable_bytes(session.sock.fileno()) > 0:
                # the peer spoke and its bytes wait unread: this process is the slow one (a
                # loop busy closing 10,000 connections, or back-pressure), not the path
                session.last_seen = now
                continue
            if silent > self.dead_after:
                close(session, f"path silent for {silent:.1f}s")
            elif silent > self.probe_after:
                try:
                    session.ping()
                except (EdgeMeshError, OSError):
                    pass


# Agents probe their peers and servers after 1 s and give a path up after 3 s, closing with
# RST (``close_now``) so the same 4-tuple can re-register or re-punch at once. A server waits
# twice as long: its agents probe first, and it must not drop a link an agent still holds,
# which would make the agent re-register; it closes plainly (nothing reuses its port).
AGENT_LIVENESS = Liveness(probe_after=1.0, dead_after=3.0)
SERVER_LIVENESS = Liveness(probe_after=2.0, dead_after=6.0)


class SessionTable:
    """Sessions by peer name; which one is used, which drain, which duplicate goes."""

    def __init__(self, own_name: str, is_link: Callable[[Session], bool]) -> None:
        self.own_name = own_name
        self.is_link = is_link  # server links are in the table but never drained or deduped
        self.sessions: dict[str, list[Session]] = {}
        self.retiring: dict[Session, float] = {}

    def add(self, session: Session) -> None:
        self.sessions.setdefault(session.peer, []).insert(0, session)

    def remove(self, session: Session) -> bool:
        """Forget ``session``; True when we retired it on purpose."""
        sessions = self.sessions.get(session.peer, [])
        if session in sessions:
            sessions.remove(session)
        if not sessions:
            self.sessions.pop(session.peer, None)
        return self.retiring.pop(session, None) is not None

    def all(self) -> list[Session]:
        return [s for sessions in self.sessions.values() for s in sessions]

    def best(self, node: str) -> Session | None:
        """The preferred live session: direct or punched before relayed, newest first."""
        live = [s for s in self.sessions.get(node, []) if not s.closed
                and not s.mux.goaway_received and s not in self.retiring]
        live.sort(key=lambda s: s.path == "relayed")
        return live[0] if live else None

    def retire(self, session: Session, reason: str) -> None:
        """No new streams on ``session`` (GOAWAY to the peer); closed once idle."""
        if session in self.retiring or session.closed:
            return
        self.retiring[session] = time.monotonic()
        log.info("retiring session to %s (%s %s): %s", session.peer, session.path,
                 session.address, reason)
        try:
            session.write(session.mux.goaway(0, reason[:200]))
        except (EdgeMeshError, OSError):
            pass

    def close_retired(self, now: float) -> None:
        for session, since in list(self.retiring.items()):
            if not session.closed and session.stream_count == 0 \
                    and now - since >= RETIRE_GRACE:
                close_now(session, "retired")

    def tidy(self, node: str) -> None:
        """Drain relayed sessions once a direct one exists; one session per kind per pair."""
        live = [s for s in self.sessions.get(node, []) if not s.closed
                and s not in self.retiring and not self.is_link(s)]
        direct = [s for s in live if s.path != "relayed" and not s.mux.goaway_received]
        if direct:
            for s in live:
                if s.path == "relayed":
                    self.retire(s, "upgraded to a direct path")
        if not punch.is_initiator(self.own_name, node):
            return  # the smaller name decides which duplicate stays; the peer follows GOAWAY
        for group in (direct, [s for s in live if s.path == "relayed"]):
            if len(group) > 1:
                group.sort(key=lambda s: (not self._ours(s), -s.created))
                for extra in group[1:]:
                    self.retire(extra, "duplicate session")

    def _ours(self, session: Session) -> bool:
        """True when the smaller-named node opened the session (both sides compute the same)."""
        return session.initiator == punch.is_initiator(self.own_name, session.peer)
