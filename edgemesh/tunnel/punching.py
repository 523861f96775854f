"""The I/O shell of TCP hole punching (the decisions are in ``punch``).

One punch between A and B (docs/tunnel-protocol.md §8):

1. A sends ``rendezvous {id, node: B}`` on a server link; the server sends both a ``punch``
   offer naming the other's public address (A's carries A's ``id``).
2. Each side, after the offer's ``delay``, connects from its tunnel port (the listener's port,
   which its NAT maps to the public port the server saw) to the other's public address. The
   SYNs cross; each NAT has an entry for the other's SYN by the time it arrives: a TCP
   simultaneous open. Where the peer's SYN reaches our listener instead (no NAT on one side),
   the listener hands the socket over (``TunnelNode.claims``).
3. The Noise roles come from the names (``punch.is_initiator``); the session's path is
   ``punched``.

A peer that asks while an offer for the same pair is running joins that run.
"""
from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
import gevent.event

from edgemesh.errors import EdgeMeshError, UnavailableError
from edgemesh.runtime import metrics
from edgemesh.runtime.tasks import spawn
from edgemesh.tunnel import control, punch
from edgemesh.tunnel.links import Adopt, ServerLink
from edgemesh.tunnel.node import TunnelNode, fmt_addr, reuse_socket
from edgemesh.tunnel.session import HANDSHAKE_TIMEOUT, Session

log = logging.getLogger(__name__)

OFFER_TIMEOUT = 3.0
CONNECT_TIMEOUT = 3.0  # drop-mode NATs punch in well under a second; then the relay's turn

PUNCHES = metrics.counter("edgemesh_tunnel_punches_total", "Hole punches by result.",
                          ["result"])
PUNCH_SECONDS = metrics.histogram("edgemesh_tunnel_punch_seconds",
                                  "Time from a punch offer to a punched session.")


@dataclass
class Run:
    """One punch to one peer: the offer may come from our request or from the peer's."""
    result: gevent.event.AsyncResult = field(default_factory=gevent.event.AsyncResult)
    started: bool = False


class Puncher:
    """Requests offers, answers them, and turns a crossed connect into a ``punched`` session."""

    def __init__(self, node: TunnelNode, state_of: Callable[[str], punch.PathState],
                 adopt: Adopt) -> None:
        self.node = node
        self.state_of = state_of  # where each attempt is recorded for ``edgemesh status``
        self.adopt = adopt  # a punched connection becomes a session of the agent's peers
        self.runs: dict[str, Run] = {}

    def request(self, link: ServerLink, node: str, rid: int, deadline: float) -> Session:
        """A punched session to ``node``, coordinated by ``link``'s server."""
        run = self.runs.get(node)
        if run is None:
            run = self.runs[node] = Run()
            assert link.session is not None
            link.session.send_control(control.Rendezvous(rid, node))
            spawn("tunnel-punch-offer-wait", self._offer_timeout, node, run)
        try:
            session = run.result.get(timeout=max(0.1, deadline - time.monotonic()))
        except gevent.Timeout:
            raise UnavailableError("punch did not finish in time") from None
        assert isinstance(session, Session)
        return session

    def _offer_timeout(self, node: str, run: Run) -> None:
        gevent.sleep(OFFER_TIMEOUT)
        if not run.started and not run.result.ready():
            self._fail(node, run, "no punch offer from the server")

    def _fail(self, node: str, run: Run, reason: str) -> None:
        if self.runs.get(node) is run:
            del self.runs[node]
        PUNCHES.labels("failed").inc()
        self.state_of(node).tried("punch-tcp", False, reason, time.time())
        if not run.result.ready():
            run.result.set_exception(UnavailableError(reason))

    def on_offer(self, msg: control.Punch) -> None:
        """A ``punch`` message from one of our servers."""
        offer = punch.parse_offer(msg)
        node = msg.node
        if isinstance(offer, str):
            run = self.runs.get(node)
            if run is not None and not run.started:
                self._fail(node, run, offer)
            return
        run = self.runs.get(node)
        if run is None:
            run = self.runs[node] = Run()
        if run.started:
            return  # both asked at once: the first offer is the one both sides follow
        run.started = True
        spawn(f"tunnel-punch-{node}", self._run, offer, run)

    def _run(self, offer: punch.Offer, run: Run) -> None:
        start = time.monotonic()
        try:
            session = self._connect(offer)
        except (EdgeMeshError, OSError, ValueError) as e:
            self._fail(offer.node, run, str(e) or type(e).__name__)
            return
        PUNCH_SECONDS.observe(time.monotonic() - start)
        PUNCHES.labels("ok").inc()
        self.state_of(offer.node).tried("punch-tcp", True, session.address, time.time())
        if self.runs.get(offer.node) is run:
            del self.runs[offer.node]
        run.result.set(session)

    def _connect(self, offer: punch.Offer) -> Session:
        gevent.sleep(offer.delay)
        sock = self._cross(offer.host, offer.port)
        node = self.node
        initiator = punch.is_initiator(node.name, offer.node)
        try:
            result, reader = node.authenticate(sock, node.hello(), offer.node,
                                               HANDSHAKE_TIMEOUT, initiator=initiator)
            if offer.key and offer.key != result.remote_static.hex():
                raise UnavailableError(f"{offer.node} proved a key other than the offer's")
        except BaseException:
            sock.close()
            raise
        return self.adopt(sock, result, reader, initiator=initiator, path="punched",
                                address=fmt_addr((offer.host, offer.port)))

    def _cross(self, host: str, port: int) -> socket.socket:
        """Connect from the tunnel port to host:port; or take the peer's connection instead."""
        node = self.node
        claimed: gevent.event.AsyncResult = gevent.event.AsyncResult()

        def take(sock: socket.socket) -> None:
            if claimed.ready():
                sock.close()
            else:
                claimed.set(sock)
        node.claims[(host, port)] = take
        try:
            self._connect_from_tunnel_port(host, port, take)
            got = claimed.get(timeout=CONNECT_TIMEOUT)
        except gevent.Timeout:
            raise UnavailableError("the crossed connection did not arrive") from None
        finally:
            node.claims.pop((host, port), None)
        assert isinstance(got, socket.socket)
        return got

    def _connect_from_tunnel_port(self, host: str, port: int,
                                  take: Callable[[socket.socket], None]) -> None:
        node = self.node
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = reuse_socket(family)
        try:
            sock.bind((node.listen_addr[0], node.listen_addr[1]))
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect((host, port))
            sock.settimeout(None)
        except OSError as e:
            sock.close()
            if e.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EISCONN):
                return  # the peer's connection reached our listener first: it is claimed
            where = fmt_addr((host, port))
            if isinstance(e, socket.timeout):
                raise UnavailableError(f"no answer from {where} in {CONNECT_TIMEOUT:.0f}s "
                                       "(the peer's NAT did not let our SYN in)") from None
            if e.errno == errno.ECONNREFUSED:
                raise UnavailableError(f"{where} answered RST (its NAT rejects instead of "
                                       "dropping: not punchable)") from None
            raise
        take(sock)
