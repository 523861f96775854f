"""Rendezvous and relay: what ``edgemesh server`` (and ``edgemesh agent --relay``) offer.

Rendezvous (control messages on a session, docs/tunnel-protocol.md §6): an agent ``register``s
its addresses; the relay answers with the address it sees (``observed``), answers ``lookup``s
for other nodes, and on ``rendezvous`` sends both nodes a ``punch`` offer (see ``punch``).

Relay: node A opens a *circuit* connection (handshake intent ``circuit``, ``connect: B``); the
relay tells B (``incoming``), B opens a circuit connection with ``accept: <token>``; the relay
answers both with one encrypted ``circuit`` record and from then on splices raw bytes. A and B
run their own end-to-end handshake through it, so the relay only ever sees their ciphertext.
Per-peer limits: circuits at once, and bytes/s over all its circuits, shared fairly among
those active (``FairShare``: a flat-out circuit cannot starve the member's other circuits).
Relay-wide: circuits at once over all peers, and an idle timeout (a circuit that carried no
byte either way for that long is closed, so parked circuits cannot hold the relay's slots).
Refusals are counted by reason (``edgemesh_relay_circuits_total``) and logged once per reason.
"""
from __future__ import annotations

import logging
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event

from edgemesh.errors import EdgeMeshError
from edgemesh.runtime import metrics, pump
from edgemesh.runtime.logs import Once
from edgemesh.runtime.tasks import spawn, spawn_forever
from edgemesh.tunnel import control, punch
from edgemesh.tunnel import frames as fr
from edgemesh.tunnel.node import Accepted
from edgemesh.tunnel.records import SecureChannel
from edgemesh.tunnel.session import Session

log = logging.getLogger(__name__)
_once = Once()

CIRCUIT_WAIT = 10.0
ANSWER_TIMEOUT = 5.0  # seconds to write a circuit answer to a member's socket
# A circuit member that vanishes (power cut, link gone) sends no FIN or RST: without these the
# relay's copy from it would wait forever and hold its sockets and its circuit slot. Probes
# start after KEEPALIVE_IDLE s of silence (agents ping every 10 s through a live circuit);
# KEEPALIVE_COUNT unanswered probes, or bytes unacknowledged for USER_TIMEOUT_MS, end it.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 15, 5, 3
USER_TIMEOUT_MS = 30_000

CIRCUITS = metrics.gauge("edgemesh_relay_circuits", "Relay circuits open, by requesting peer.",
                         ["peer"])
CIRCUITS_TOTAL = metrics.counter("edgemesh_relay_circuits_total",
                                 "Relay circuit requests by result.", ["result"])
RELAY_BYTES = metrics.counter("edgemesh_relay_bytes_total", "Bytes relayed, by sending peer.",
                              ["peer"])
THROTTLED = metrics.counter("edgemesh_relay_throttled_seconds_total",
                            "Time relay splicing waited on a peer's bytes/s limit.", ["peer"])
PUNCHES = metrics.counter("edgemesh_relay_punches_total",
                          "Hole-punch coordination requests, by outcome.", ["result"])
IDLE_CLOSED = metrics.counter("edgemesh_relay_idle_circuits_closed_total",
                              "Relay circuits closed after carrying nothing for the idle "
                              "timeout.")
REGISTERED = metrics.gauge("edgemesh_relay_registered_nodes", "Nodes registered here.")


class TokenBucket:
    """Sans-IO rate limit: ``take(n, now)`` returns how long to wait before sending n bytes."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else rate
        self.tokens = self.burst
        self.stamp: float | None = None

    def take(self, n: int, now: float) -> float:
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


ACTIVE_WINDOW = 1.0  # a circuit direction that moved a byte this recently shares the rate


class FairShare:
    """Sans-IO per-member rate limit, shared fairly: each of a sender's circuit directions
    (flows) that was active in the last ``ACTIVE_WINDOW`` s gets an equal part of ``rate``
    (its own token bucket), so one flow streaming flat out cannot make another flow of the
    same member wait behind its debt; alone, a flow gets the whole rate."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.flows: dict[object, tuple[TokenBucket, list[float]]] = {}

    def take(self, flow: object, n: int, now: float) -> float:
        entry = self.flows.get(flow)
        if entry is None:
            entry = self.flows[flow] = (TokenBucket(self.rate), [now])
        bucket, seen = entry
        seen[0] = now
        active = sum(1 for _, (t,) in self.flows.values() if now - t <= ACTIVE_WINDOW)
        share = self.rate / max(1, active)
        if bucket.rate != share:
            bucket.rate = bucket.burst = share
            bucket.tokens = min(bucket.tokens, share)
        return bucket.take(n, now)

    def remove(self, flow: object) -> None:
        self.flows.pop(flow, None)


@dataclass
class Registration:
    node: str
    session: Session
    key: str
    addrs: list[str]
    port: int
    observed: str
    nat: str = punch.NatKind.UNKNOWN.value
    mapped: bool = True  # the agent's link comes from its tunnel port: ``observed`` is punchable

    def record(self, rid: int | None = None) -> control.Record:
        return control.Record(rid, True, self.node, not self.session.closed, self.key,
                              tuple(self.addrs), self.port, self.observed, self.nat)

    def party(self) -> punch.Party:
        return punch.Party(self.node, self.key, self.observed, tuple(self.addrs), self.port,
                           self.nat, self.session.rtt)


@dataclass(eq=False)
class _Circuit:
    """A spliced circuit: its two sockets and when a byte last crossed it."""
    a: socket.socket
    b: socket.socket
    last: float

    def idle(self, now: float, timeout: float) -> bool:
        return now - self.last > timeout


@dataclass
class _Pending:
    requester: str
    target: str
    arrived: gevent.event.AsyncResult = field(default_factory=gevent.event.AsyncResult)


class RelayCore:
    """Registrations, lookups and circuits for one server (or relaying agent)."""

    def __init__(self, bytes_per_second: int, max_circuits: int, max_total: int = 1024,
                 idle_timeout: float = 300.0) -> None:
        self.rate = bytes_per_second
        self.max_circuits = max_circuits
        self.max_total = max_total
        self.idle_timeout = idle_timeout
        self.registry: dict[str, Registration] = {}
        self.circuits: dict[str, int] = {}
        self.total = 0  # circuits held or being set up, over every requester
        self.live: set[_Circuit] = set()
        self._sweeper: gevent.Greenlet | None = None
        self.buckets: dict[str, FairShare] = {}
        self._pending: dict[str, _Pending] = {}
        self._cooldown = punch.PairCooldown()
        REGISTERED.fn = lambda: len(self.registry)

    # ---- rendezvous ---------------------------------------------------------------------------

    def on_control(self, session: Session, msg: control.Message) -> bool:
        """Handle a rendezvous message; False if it is not one of ours."""
        if isinstance(msg, control.Register):
            self._register(session, msg)
        elif isinstance(msg, control.Lookup):
            reg = self.registry.get(msg.node)
            session.send_control(reg.record(msg.id) if reg else
                                 control.Record(msg.id, False, msg.node, False))
        elif isinstance(msg, control.Rendezvous):
            self._rendezvous(session, msg)
        else:
            return False
        return True

    def _rendezvous(self, session: Session, msg: control.Rendezvous) -> None:
        """Send both nodes a ``punch`` offer naming the other (docs/tunnel-protocol.md §8)."""
        rid, target = msg.id, msg.node
        me, other = self.registry.get(session.peer), self.registry.get(target)
        if me is None or me.session is not session:
            reason = "register first"
        elif other is None or other.session.closed:
            reason = f"not registered here: {target}"
        elif target == session.peer:
            reason = "punch to self"
        elif not (me.mapped and other.mapped):
            who = "this node's" if not me.mapped else "the peer's"
            reason = f"{who} link to this server is not from its tunnel port (yet)"
        elif not self._cooldown.allow(f"{session.peer}/{id(session)}",
                                      f"{target}/{id(other.session)}", time.monotonic()):
            PUNCHES.labels("coalesced").inc()
            return  # an offer for this pair just went out; the asker waits for it
        else:
            to_me, to_other = punch.offers(me.party(), other.party(), rid)
            PUNCHES.labels("offered").inc()
            other.session.send_control(to_other)
            session.send_control(to_me)
            return
        PUNCHES.labels("refused").inc()
        session.send_control(control.Punch(False, target, rid, reason=reason))

    def _register(self, session: Session, msg: control.Register) -> None:
        addrs = list(msg.addrs[:16])
        nat = msg.nat if msg.nat in {k.value for k in punch.NatKind} \
            else punch.NatKind.UNKNOWN.value
        self.registry[session.peer] = Registration(session.peer, session, session.peer_key.hex(),
                                                   addrs, msg.port, session.address, nat,
                                                   msg.mapped)
        session.send_control(control.Registered(session.address))
        log.info("registered %s (lan %s port %d, seen as %s)", session.peer, addrs, msg.port,
                 session.address)

    def on_session_closed(self, session: Session) -> None:
        reg = self.registry.get(session.peer)
        if reg is not None and reg.session is session:
            del self.registry[session.peer]

    def records(self) -> list[dict[str, Any]]:
        """The admin view: one row per registration, as a ``record`` answer carries it."""
        rows = []
        for reg in sorted(self.registry.values(), key=lambda r: r.node):
            row = control.to_dict(reg.record())
            rows.append({k: v for k, v in row.items() if k not in ("op", "id", "found")})
        return rows

    # ---- circuits -----------------------------------------------------------------------------

    def handle_circuit(self, acc: Accepted) -> None:
        """An authenticated connection with intent ``circuit``: connect or accept one."""
        channel = SecureChannel(acc.result.send, acc.result.recv)
        hello = acc.result.remote_hello
        try:
            if "connect" in hello.extra:
                self._connect(acc, channel, str(hello.extra["connect"]))
            elif "accept" in hello.extra:
                self._accept(acc, channel, str(hello.extra["accept"]))
            else:
                self._answer(acc.sock, channel, False, "circuit: neither connect nor accept")
                acc.sock.close()
        except (OSError, EdgeMeshError) as e:
            log.debug("circuit from %s failed: %s", hello.node, e)
            acc.sock.close()

    def _connect(self, acc: Accepted, channel: SecureChannel, target: str) -> None:
        requester = acc.result.remote_hello.node
        reason = self._refusal(requester, target)
        if reason:
            label = reason.split(":")[0].replace(" ", "_")
            CIRCUITS_TOTAL.labels(label).inc()
            if _once(label):
                log.warning("refused a circuit %s -> %s: %s", requester, target, reason)
            self._answer(acc.sock, channel, False, reason)
            acc.sock.close()
            return
        token = secrets.token_hex(16)
        pending = self._pending[token] = _Pending(requester, target)
        self.circuits[requester] = self.circuits.get(requester, 0) + 1
        self.total += 1
        CIRCUITS.labels(requester).inc()
        try:
            self.registry[target].session.send_control(control.Incoming(token, requester))
            other = pending.arrived.get(timeout=CIRCUIT_WAIT)
        except (gevent.Timeout, EdgeMeshError):
            CIRCUITS_TOTAL.labels("target_did_not_answer").inc()
            self._answer(acc.sock, channel, False, f"{target} did not answer")
            acc.sock.close()
            self._release(requester)
            return
        finally:
            self._pending.pop(token, None)
        b_sock, b_channel, b_leftover = other
        CIRCUITS_TOTAL.labels("ok").inc()
        self._answer(b_sock, b_channel, True, "")
        self._answer(acc.sock, channel, True, "")
        log.info("circuit %s -> %s", requester, target)
        try:
            self._splice(acc.sock, acc.reader.leftover(), requester, b_sock, b_leftover, target)
        finally:
            self._release(requester)

    def _accept(self, acc: Accepted, channel: SecureChannel, token: str) -> None:
        pending = self._pending.get(token)
        if pending is None or pending.target != acc.result.remote_hello.node:
            self._answer(acc.sock, channel, False, "unknown circuit")
            acc.sock.close()
            return
        # A token is good for one accept: a second one is an unknown circuit, and the socket
        # the first one left waiting is never overwritten (and leaked).
        del self._pending[token]
        pending.arrived.set((acc.sock, channel, acc.reader.leftover()))

    def _refusal(self, requester: str, target: str) -> str:
        if target not in self.registry or self.registry[target].session.closed:
            return f"not registered: {target}"
        if target == requester:
            return "circuit to self"
        if self.circuits.get(requester, 0) >= self.max_circuits:
            return f"circuit limit: {requester} has {self.max_circuits} circuits"
        if self.total >= self.max_total:
            return f"relay full: {self.max_total} circuits"
        return ""

    def _release(self, requester: str) -> None:
        self.circuits[requester] = max(0, self.circuits.get(requester, 1) - 1)
        self.total = max(0, self.total - 1)
        CIRCUITS.labels(requester).dec()

    @staticmethod
    def _answer(sock: socket.socket, channel: SecureChannel, ok: bool, reason: str) -> None:
        body = control.encode(control.Circuit(ok, reason))
        record = channel.seal(fr.encode_frame(fr.Frame(fr.FrameType.CONTROL, 0, body)))
        with gevent.Timeout(ANSWER_TIMEOUT, TimeoutError("circuit answer timed out")):
            sock.sendall(record)

    def _splice(self, a: socket.socket, a_left: bytes, a_name: str, b: socket.socket,
                b_left: bytes, b_name: str) -> None:
        for sock in (a, b):
            detect_dead_peer(sock)
        circuit = _Circuit(a, b, time.monotonic())
        self.live.add(circuit)
        self._start_sweeper()
        one = spawn("relay-splice", self._copy, a, b, a_left, a_name, circuit)
        try:
            self._copy(b, a, b_left, b_name, circuit)
            one.join()
        finally:
            self.live.discard(circuit)
            one.kill(block=False)
            a.close()
            b.close()

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = spawn_forever("relay-idle", self.close_idle,
                                          backoff=min(self.idle_timeout / 4, 5.0))

    def close_idle(self) -> None:
        """Shut down circuits that carried nothing for ``idle_timeout``: both copies end."""
        now = time.monotonic()
        for circuit in [c for c in self.live if c.idle(now, self.idle_timeout)]:
            self.live.discard(circuit)
            IDLE_CLOSED.inc()
            if _once("idle"):
                log.info("closed a relay circuit idle for over %.0fs (logged once)",
                         self.idle_timeout)
            for sock in (circuit.a, circuit.b):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        """Stop the idle sweep (circuits carry on until their members close them)."""
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
            self._sweeper = None

    def _copy(self, src: socket.socket, dst: socket.socket, first: bytes, sender: str,
              circuit: _Circuit) -> None:
        share = self.buckets.setdefault(sender, FairShare(self.rate))
        counter, throttled = RELAY_BYTES.labels(sender), THROTTLED.labels(sender)
        flow = object()

        def pace(n: int) -> float:
            counter.inc(n)
            circuit.last = now = time.monotonic()
            wait = share.take(flow, n, now)
            if wait > 0:
                throttled.inc(wait)
            return wait

        try:
            pump.copy_stream(src, dst, first, pace)  # in the kernel: no copy into Python
        except OSError:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        finally:
            share.remove(flow)


def detect_dead_peer(sock: socket.socket) -> None:
    """TCP keepalive and a user timeout: a vanished peer errors the socket within ~30 s."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
