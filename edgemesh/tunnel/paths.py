"""The path strategies an agent dials a peer along (docs/tunnel-protocol.md §8.1).

``DIRECT`` races the peer's own addresses (LAN first) and a hole punch; ``RELAY`` opens a
circuit through each server link that is up. Both record every attempt in the peer's
``punch.PathState`` for ``edgemesh status``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import gevent
import gevent.event

from edgemesh.errors import EdgeMeshError, UnavailableError
from edgemesh.runtime.tasks import spawn
from edgemesh.tunnel.links import PeerRecord, ServerLink
from edgemesh.tunnel.node import fmt_addr
from edgemesh.tunnel.punch import PathState
from edgemesh.tunnel.session import Session

DIRECT_STAGGER = 0.25
DIRECT_BUDGET = 2.5  # then the relay gets its turn (unanswered SYNs to a NAT just hang)
PUNCH_BUDGET = 4.5  # a punch waits for its offer and crossed SYNs (a round trip or two)


class PathContext(Protocol):
    """What a path strategy needs from the agent's peers (``peers.Peers`` provides it)."""

    @property
    def links(self) -> list[ServerLink]: ...

    def lookup(self, node: str) -> PeerRecord | None: ...

    def state(self, node: str) -> PathState: ...

    def candidates(self, node: str) -> list[tuple[str, str, int]]: ...

    def punch_link(self, node: str) -> tuple[ServerLink | None, str]: ...

    def dial_direct(self, node: str, host: str, port: int, deadline: float) -> Session: ...

    def punch_tcp(self, link: ServerLink, node: str, deadline: float) -> Session: ...

    def dial_relayed(self, link: ServerLink, node: str, deadline: float) -> Session: ...


class PathStrategy(Protocol):
    name: str

    def connect(self, peers: PathContext, node: str, deadline: float) -> Session | None: ...


Dialer = Callable[[float], Session]


class DirectPath:
    """The peer's own addresses, and a hole punch where one can work; first handshake wins."""
    name = "direct"

    def connect(self, peers: PathContext, node: str, deadline: float) -> Session | None:
        peers.lookup(node)
        plan = self.plan(peers, node)
        if not plan:
            return None
        state = peers.state(node)
        winner: gevent.event.AsyncResult = gevent.event.AsyncResult()
        errors: list[str] = []
        pending = {i for i in range(len(plan))}

        def attempt(i: int, kind: str, where: str, dial: Dialer) -> None:
            gevent.sleep(0 if kind == "punch-tcp" else i * DIRECT_STAGGER)
            if winner.ready():
                return
            try:
                session = dial(deadline)
            except (EdgeMeshError, OSError, ValueError) as e:
                pending.discard(i)
                errors.append(f"{where}: {e}")
                if kind != "punch-tcp":  # the puncher records its own outcome
                    state.tried(kind, False, f"{where}: {e}", time.time())
                if not pending:
                    winner.set(None)
                return
            pending.discard(i)
            if winner.ready():
                session.close("another path won")
                return
            if kind != "punch-tcp":
                state.tried(kind, True, where, time.time())
            winner.set(session)

        workers = [spawn("tunnel-direct", attempt, i, *step) for i, step in enumerate(plan)]
        punching = any(kind == "punch-tcp" for kind, _, _ in plan)
        try:
            budget = min(PUNCH_BUDGET if punching else DIRECT_BUDGET,
                         deadline - time.monotonic() - 1.0)
            session = winner.get(timeout=max(0.1, budget))
        except gevent.Timeout:
            session = None
            for i in pending:
                kind, where, _ = plan[i]
                if kind != "punch-tcp":
                    state.tried(kind, False, f"{where}: no answer", time.time())
        finally:
            for w in workers:
                w.kill(block=False)
        if session is None and errors:
            raise UnavailableError("; ".join(errors))
        return session  # type: ignore[no-any-return]

    @staticmethod
    def plan(peers: PathContext, node: str) -> list[tuple[str, str, Dialer]]:
        """(kind, where, dial) for each direct attempt, in order."""
        state = peers.state(node)
        link, skip = peers.punch_link(node)
        state.punch_skip = skip
        plan: list[tuple[str, str, Dialer]] = []
        for kind, host, port in peers.candidates(node):
            if kind == "public" and (link is not None or "symmetric NAT" in skip):
                # the punch dials it, from the same port, at the agreed moment; behind a
                # symmetric NAT an unsolicited SYN cannot get in: don't wait for it
                continue

            def dial(dl: float, h: str = host, p: int = port) -> Session:
                return peers.dial_direct(node, h, p, dl)
            plan.append((kind, fmt_addr((host, port)), dial))
        if link is not None:
            plan.append(("punch-tcp", f"via {link.address}",
                         lambda dl: peers.punch_tcp(link, node, dl)))
        elif skip:
            state.tried("punch-tcp", False, skip, time.time())
        return plan


class RelayPath:
    """A circuit through each server link that is up, in order."""
    name = "relay"

    def connect(self, peers: PathContext, node: str, deadline: float) -> Session | None:
        errors = []
        state = peers.state(node)
        for link in peers.links:
            if not link.up:
                continue
            try:
                session = peers.dial_relayed(link, node, deadline)
            except (EdgeMeshError, OSError) as e:
                errors.append(f"{link.address}: {e}")
                state.tried(f"relay:{link.address}", False, str(e), time.time())
                continue
            state.tried(f"relay:{link.address}", True, "", time.time())
            return session
        if errors:
            raise UnavailableError("; ".join(errors))
        return None


DIRECT = DirectPath()
RELAY = RelayPath()
# The order paths are tried in (hole punching is part of DIRECT: it races the LAN addresses).
PATHS: list[PathStrategy] = [DIRECT, RELAY]
