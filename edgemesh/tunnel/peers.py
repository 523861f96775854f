"""The agent's side of the mesh: server links, peer lookup, and the path to each peer.

Paths to a node are tried in order (``paths.PATHS``): direct — the peer's LAN addresses from its
registration, its Node object's addresses, then a hole punch coordinated by a server (or, when
punching cannot work, a plain dial to its public address); attempts staggered, first
handshake wins — then through a relay (each server link that is up).

While running (``monitor``, twice a second): sessions silent for ``SILENT_DEAD`` seconds are
closed (a lost NAT mapping shows as silence, not as an error); a peer that lost its last
session is reconnected through a relay at once, then upgraded; a relayed peer is retried
direct with backoff (``punch.PathState``); once a direct session exists, relayed ones drain
(GOAWAY, closed when idle); duplicate sessions to one peer are retired by the side with the
smaller name, so both sides agree. Punching itself is in ``punching``.
"""
from __future__ import annotations

import itertools
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event

from edgemesh.config import split_host_port
from edgemesh.errors import EdgeMeshError, RemoteProtocolError, UnavailableError
from edgemesh.meta.store import Store
from edgemesh.runtime.tasks import spawn
from edgemesh.tunnel import control, punch
from edgemesh.tunnel import frames as fr
from edgemesh.tunnel.node import TunnelNode, fmt_addr
from edgemesh.tunnel.paths import DIRECT, PATHS, PUNCH_BUDGET, RELAY, PathStrategy
from edgemesh.tunnel.punching import Puncher
from edgemesh.tunnel.records import SecureChannel
from edgemesh.tunnel.session import HANDSHAKE_TIMEOUT, Session, read_record
from edgemesh.tunnel.stream import readable_bytes

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 3.0
RECORD_TTL = 30.0
MONITOR_PERIOD = 0.5
SILENT_PROBE = 1.0  # idle this long: ping (the session's own pinger is every 10 s)
SILENT_DEAD = 3.0  # no bytes this long despite probes: the path is gone
RECOVER_DEFER = 2.0  # the larger-named side lets the smaller one reconnect first
MAX_SEEN = 4096
RETIRE_GRACE = 1.0  # a retired session closes once idle, not before this
RELINK_AFTER = 20.0  # a server link from another port (tunnel port's 4-tuple in TIME_WAIT)


def close_now(session: Session, reason: str) -> None:
    """Close with RST, leaving no TIME_WAIT: the same 4-tuple (tunnel port to a server, or
    to a peer's public address) must be usable again at once, to re-register or re-punch."""
    try:
        session.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    session.close(reason)


@dataclass
class PeerRecord:
    """What a server knows about a node (a ``record`` control message)."""
    node: str
    key: str = ""
    addrs: list[str] = field(default_factory=list)
    port: int = 0
    public: str = ""
    online: bool = False
    fetched: float = 0.0
    nat: str = ""


@dataclass
class ServerLink:
    """The long-lived control session to one rendezvous/relay server."""
    address: str
    session: Session | None = None
    observed: str = ""
    earlier: str = ""  # the observation before the last re-registration
    last_error: str = ""
    local_port: int = 0  # not the tunnel port when that 4-tuple was still in TIME_WAIT

    @property
    def up(self) -> bool:
        return self.session is not None and not self.session.closed


class Peers:
    """Sessions by node name, the server links, and dialing along the path list."""

    def __init__(self, node: TunnelNode, store: Store, servers: list[str], listen_port: int,
                 advertise: list[str], make_session: Callable[..., Session]) -> None:
        self.node = node
        self.store = store
        self.links = [ServerLink(s) for s in servers]
        self.listen_port = listen_port
        self.advertise = advertise
        self.make_session = make_session
        self.sessions: dict[str, list[Session]] = {}
        self.records: dict[str, PeerRecord] = {}
        self.paths: dict[str, punch.PathState] = {}
        self.seen: dict[str, tuple[str, int]] = {}  # node -> (ip, tunnel port) of a direct peer
        self.nat = punch.NatKind.UNKNOWN
        self.puncher = Puncher(self)
        self._retiring: dict[Session, float] = {}
        self._upgrading: set[str] = set()
        self._dialing: dict[str, gevent.event.AsyncResult] = {}
        self._lookups: dict[int, gevent.event.AsyncResult] = {}
        self._ids = itertools.count(1)
        self._greenlets: list[gevent.Greenlet] = []
        self._stopping = False
        self.hole_punching = True
        # set by a relaying agent: True for a session a node registered on with us (our
        # client, not a peer we need a path to)
        self.is_client: Callable[[Session], bool] = lambda s: False

    def start(self) -> None:
        for link in self.links:
            self._greenlets.append(spawn(f"tunnel-server-{link.address}", self._link_loop,
                                         link))
        self._greenlets.append(spawn("tunnel-paths", self._monitor_loop))

    def stop(self) -> None:
        self._stopping = True
        for g in self._greenlets:
            g.kill(block=False)
        for sessions in list(self.sessions.values()):
            for s in list(sessions):
                s.close("shutting down")

    def state(self, node: str) -> punch.PathState:
        return self.paths.setdefault(node, punch.PathState())

    # ---- sessions -----------------------------------------------------------------------------

    def add(self, session: Session) -> None:
        self.sessions.setdefault(session.peer, []).insert(0, session)
        if self.is_link(session):
            return
        if session.path == "direct":
            self._remember_seen(session)
        state = self.state(session.peer)
        if session.path != "relayed":
            state.went_direct()
        elif state.next_at is None:
            state.upgrade_failed(time.monotonic())  # keep trying direct, with backoff

    def _remember_seen(self, session: Session) -> None:
        """The address a direct session came from, at the port its Hello names: a path back
        to the peer that needs no server."""
        where = punch.split(session.address)
        port = session.peer_hello.extra.get("port")
        if where is not None and isinstance(port, int) and 0 < port < 65536:
            self.seen[session.peer] = (where[0], port)
            if len(self.seen) > MAX_SEEN:
                self.seen.pop(next(iter(self.seen)))

    def removed(self, session: Session) -> None:
        sessions = self.sessions.get(session.peer, [])
        if session in sessions:
            sessions.remove(session)
        if not sessions:
            self.sessions.pop(session.peer, None)
        was_link = False
        for link in self.links:
            if link.session is session:
                link.session, was_link = None, True
        intended = self._retiring.pop(session, None) is not None
        if not (intended or was_link or self._stopping or self.best(session.peer)
                or self.is_client(session)):
            self._lost(session)

    def is_link(self, session: Session) -> bool:
        return any(link.session is session for link in self.links) \
            or session.peer_hello.role == "server"

    def best(self, node: str) -> Session | None:
        """The preferred live session: direct or punched before relayed, newest first."""
        live = [s for s in self.sessions.get(node, []) if not s.closed
                and not s.mux.goaway_received and s not in self._retiring]
        live.sort(key=lambda s: s.path == "relayed")
        return live[0] if live else None

    def retire(self, session: Session, reason: str) -> None:
        """No new streams on ``session`` (GOAWAY to the peer); closed once idle."""
        if session in self._retiring or session.closed:
            return
        self._retiring[session] = time.monotonic()
        log.info("retiring session to %s (%s %s): %s", session.peer, session.path,
                 session.address, reason)
        try:
            session.write(session.mux.goaway(0, reason[:200]))
        except (EdgeMeshError, OSError):
            pass

    def session_for(self, node: str, timeout: float) -> Session:
        """A session to ``node``, connecting along the path list (one dial per node at once)."""
        existing = self.best(node)
        if existing is not None:
            return existing
        pending = self._dialing.get(node)
        if pending is None:
            pending = self._dialing[node] = gevent.event.AsyncResult()
            spawn(f"tunnel-dial-{node}", self._dial, node, pending, time.monotonic() + timeout)
        try:
            session = pending.get(timeout=timeout)
        except gevent.Timeout:
            raise UnavailableError(f"no path to {node} within {timeout:.1f}s") from None
        assert isinstance(session, Session)
        return session

    def _dial(self, node: str, result: gevent.event.AsyncResult, deadline: float,
              paths: list[PathStrategy] | None = None) -> None:
        errors = []
        try:
            for strategy in paths or PATHS:
                if time.monotonic() >= deadline:
                    break
                try:
                    session = strategy.connect(self, node, deadline)
                except (EdgeMeshError, OSError) as e:
                    errors.append(f"{strategy.name}: {e}")
                    continue
                if session is not None:
                    result.set(session)
                    return
                errors.append(f"{strategy.name}: no path")
            result.set_exception(UnavailableError(f"no path to {node} ({'; '.join(errors)})"))
        finally:
            if self._dialing.get(node) is result:
                self._dialing.pop(node, None)

    def adopt(self, sock: socket.socket, result: Any, reader: Any, *, initiator: bool,
              path: str, address: str) -> Session:
        session = self.make_session(sock, result, reader, initiator=initiator, path=path,
                                    address=address)
        self.add(session)
        session.start()
        return session

    # ---- losing and regaining paths -----------------------------------------------------------

    def _lost(self, session: Session) -> None:
        """The last session to a peer ended without us asking: reconnect through a relay now
        (fast and known to work), then let the monitor upgrade it."""
        node = session.peer
        if session.path != "relayed":
            self.state(node).path_lost(time.monotonic(), session.close_reason)
        delay = 0.0 if punch.is_initiator(self.node.name, node) else RECOVER_DEFER
        # a LAN path comes back by itself; a punched or relayed one goes via a relay first
        order = [DIRECT, RELAY] if session.path == "direct" else [RELAY, DIRECT]
        spawn(f"tunnel-recover-{node}", self._recover, node, delay, order)

    def _recover(self, node: str, delay: float, order: list[PathStrategy]) -> None:
        gevent.sleep(delay)
        if self.best(node) is not None or node in self._dialing:
            return
        pending = self._dialing[node] = gevent.event.AsyncResult()
        self._dial(node, pending, time.monotonic() + 8.0, order)
        if pending.successful():
            log.info("reconnected to %s (%s)", node, pending.value.path)

    def _monitor_loop(self) -> None:
        while True:
            gevent.sleep(MONITOR_PERIOD)
            now = time.monotonic()
            for session in self._all_sessions():
                self._check_alive(session, now)
            self._close_retired(now)
            for node in list(self.sessions):
                self._tidy(node)
                self._maybe_upgrade(node, now)

    def _close_retired(self, now: float) -> None:
        for session, since in list(self._retiring.items()):
            if not session.closed and session.stream_count == 0 \
                    and now - since >= RETIRE_GRACE:
                close_now(session, "retired")

    def _all_sessions(self) -> list[Session]:
        out = [s for sessions in self.sessions.values() for s in sessions]
        return out + [lk.session for lk in self.links if lk.session and lk.session not in out]

    def _check_alive(self, session: Session, now: float) -> None:
        if session.closed:
            return
        silent = now - session.last_seen
        if silent > SILENT_PROBE and readable_bytes(session.sock.fileno()) > 0:
            # the peer spoke and its bytes wait unread: this agent is the slow one (a loop
            # busy with 10,000 connections closing, or back-pressure), not the path
            session.last_seen = now
            return
        if silent > SILENT_DEAD:
            close_now(session, f"path silent for {silent:.1f}s")
        elif silent > SILENT_PROBE:
            try:
                session.ping()
            except (EdgeMeshError, OSError):
                pass

    def _tidy(self, node: str) -> None:
        """Drain relayed sessions once a direct one exists; one session per kind per pair."""
        live = [s for s in self.sessions.get(node, []) if not s.closed
                and s not in self._retiring and not self.is_link(s)]
        direct = [s for s in live if s.path != "relayed" and not s.mux.goaway_received]
        if direct:
            for s in live:
                if s.path == "relayed":
                    self.retire(s, "upgraded to a direct path")
        if not punch.is_initiator(self.node.name, node):
            return  # the smaller name decides which duplicate stays; the peer follows GOAWAY
        for group in (direct, [s for s in live if s.path == "relayed"]):
            if len(group) > 1:
                group.sort(key=lambda s: (not self._ours(s), -s.created))
                for extra in group[1:]:
                    self.retire(extra, "duplicate session")

    def _ours(self, session: Session) -> bool:
        """True when the smaller-named node opened the session (both sides compute the same)."""
        return session.initiator == punch.is_initiator(self.node.name, session.peer)

    def _maybe_upgrade(self, node: str, now: float) -> None:
        best = self.best(node)
        if best is None or best.path != "relayed" or node in self._upgrading:
            return
        state = self.state(node)
        if state.next_at is None:
            state.upgrade_failed(now)
        elif now >= state.next_at:
            self._upgrading.add(node)
            spawn(f"tunnel-upgrade-{node}", self._upgrade, node)

    def _upgrade(self, node: str) -> None:
        try:
            self.records.pop(node, None)  # the peer's NAT or address may have changed
            session = DIRECT.connect(self, node, time.monotonic() + PUNCH_BUDGET + 1.0)
        except (EdgeMeshError, OSError):
            session = None
        finally:
            self._upgrading.discard(node)
        if session is None:
            self.state(node).upgrade_failed(time.monotonic())
        else:
            log.info("upgraded %s to a %s path (%s)", node, session.path, session.address)

    # ---- direct -------------------------------------------------------------------------------

    def candidates(self, node: str) -> list[tuple[str, str, int]]:
        """Direct addresses of ``node`` in order, with their kind: lan (registered, or seen on
        a direct session), node (its Node object), public."""
        rec = self.records.get(node)
        came_from = self.seen.get(node)
        port = rec.port if rec and rec.port else came_from[1] if came_from else self.listen_port
        out: list[tuple[str, str, int]] = []
        if rec:
            out += [("lan", a, port) for a in rec.addrs]
        if came_from:
            out.append(("lan", *came_from))
        obj = self.store.node(node)
        if obj is not None:
            for kind in ("InternalIP", "ExternalIP"):
                out += [("node", a, port) for t, a in obj.addresses if t == kind]
        if rec and rec.public:
            try:
                out.append(("public", *split_host_port(rec.public)))
            except ValueError:
                pass
        done: set[tuple[str, int]] = set()
        unique = []
        for kind, host, p in out:
            if (host, p) not in done:
                done.add((host, p))
                unique.append((kind, host, p))
        return unique

    def punch_link(self, node: str) -> tuple[ServerLink | None, str]:
        """The server link to coordinate a punch with ``node``, or why there is none."""
        if not self.hole_punching:
            return None, "hole punching is off (modules.edgeTunnel.holePunching)"
        rec = self.records.get(node)
        if rec is None or not rec.online:
            return None, "peer not registered with any server"
        mine = next((lk.observed for lk in self.links if lk.up and lk.observed
                     and lk.local_port == self.listen_port), "")
        reason = punch.skip_reason(self.nat, mine, rec.nat, rec.public)
        if reason:
            return None, reason
        link = next((lk for lk in self.links if lk.up and lk.local_port == self.listen_port),
                    None)
        return link, "" if link else "no server link from the tunnel port to coordinate"

    def punch_tcp(self, link: ServerLink, node: str, deadline: float) -> Session:
        return self.puncher.request(link, node, next(self._ids), deadline)

    def dial_direct(self, node: str, host: str, port: int, deadline: float) -> Session:
        timeout = max(0.1, min(HANDSHAKE_TIMEOUT, deadline - time.monotonic()))
        sock = self.node.dial(host, port, timeout)
        try:
            result, reader = self.node.authenticate(sock, self.node.hello(), node, timeout)
            self._check_record_key(node, result.remote_static)
        except BaseException:
            sock.close()
            raise
        return self.adopt(sock, result, reader, initiator=True, path="direct",
                          address=fmt_addr((host, port)))

    def _check_record_key(self, node: str, key: bytes) -> None:
        rec = self.records.get(node)
        if rec and rec.key and rec.key != key.hex():
            raise UnavailableError(f"{node} proved a key other than its server record's")

    # ---- relay --------------------------------------------------------------------------------

    def dial_relayed(self, link: ServerLink, node: str, deadline: float) -> Session:
        host, port = split_host_port(link.address)
        timeout = max(0.1, min(HANDSHAKE_TIMEOUT, deadline - time.monotonic()))
        sock = self.node.dial(host, port, timeout, shared_port=False)
        try:
            leftover = self._open_circuit(sock, link, {"connect": node}, timeout)
            result, reader = self.node.authenticate(sock, self.node.hello(), node, timeout,
                                                    reader=leftover)
            self._check_record_key(node, result.remote_static)
        except BaseException:
            sock.close()
            raise
        return self.adopt(sock, result, reader, initiator=True, path="relayed",
                          address=f"via {link.address}")

    def _open_circuit(self, sock: socket.socket, link: ServerLink, extra: dict[str, Any],
                      timeout: float) -> Any:
        server = link.session.peer if link.session else None
        result, reader = self.node.authenticate(sock, self.node.hello("circuit", **extra),
                                                server, timeout)
        channel = SecureChannel(result.send, result.recv)
        body = read_record(sock, reader, time.monotonic() + timeout)
        frame = fr.decode_frame(channel.open(body))
        answer = control.decode(frame.payload)
        if not isinstance(answer, control.Circuit):
            raise RemoteProtocolError(f"relay {link.address} answered {answer.op}, not circuit")
        if not answer.ok:
            raise UnavailableError(f"relay {link.address} refused: {answer.reason}")
        leftover = type(reader)()
        leftover.feed(reader.leftover())
        return leftover

    def _accept_circuit(self, link: ServerLink, token: str, from_node: str) -> None:
        host, port = split_host_port(link.address)
        sock = self.node.dial(host, port, HANDSHAKE_TIMEOUT, shared_port=False)
        try:
            leftover = self._open_circuit(sock, link, {"accept": token}, HANDSHAKE_TIMEOUT)
            result, reader = self.node.authenticate(sock, self.node.hello(), from_node,
                                                    reader=leftover, initiator=False)
        except BaseException:
            sock.close()
            raise
        self.adopt(sock, result, reader, initiator=False, path="relayed",
                   address=f"via {link.address}")

    # ---- server links -------------------------------------------------------------------------

    def _link_loop(self, link: ServerLink) -> None:
        backoff = 0.5
        while True:
            try:
                host, port = split_host_port(link.address)
                sock = self.node.dial(host, port, HANDSHAKE_TIMEOUT)
                try:
                    result, reader = self.node.authenticate(sock, self.node.hello(), None)
                except BaseException:
                    sock.close()
                    raise
                session = self.adopt(sock, result, reader, initiator=True, path="direct",
                                     address=link.address)
                link.session, link.last_error, backoff = session, "", 0.5
                link.local_port = sock.getsockname()[1]
                self._register(link)
                since = time.monotonic()
                while not session.closed:
                    gevent.sleep(0.5)
                    if link.local_port != self.listen_port \
                            and time.monotonic() - since > RELINK_AFTER:
                        close_now(session, "reconnecting from the tunnel port")
                link.last_error = session.close_reason
            except (EdgeMeshError, OSError) as e:
                link.last_error = str(e)
                log.debug("server %s: %s", link.address, e)
            gevent.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _register(self, link: ServerLink) -> None:
        if link.session is not None:
            link.session.send_control(control.Register(
                tuple(self.local_addresses()), self.listen_port, self.nat.value,
                link.local_port == self.listen_port))

    def _observed(self, link: ServerLink, observed: str) -> None:
        if link.observed and link.observed != observed:
            link.earlier = link.observed
        link.observed = observed
        # only links from the tunnel port say what peers will see when we punch from it
        mapped = [lk for lk in self.links if lk.local_port == self.listen_port]
        nat = punch.classify_nat(self.local_addresses(), self.listen_port,
                                 [lk.observed for lk in mapped if lk.up and lk.observed],
                                 [lk.earlier for lk in mapped if lk.earlier])
        if nat != self.nat:
            log.info("NAT in front of this node: %s (servers see %s)", nat.value,
                     ", ".join(lk.observed for lk in self.links if lk.observed))
            self.nat = nat
            for lk in self.links:
                if lk.up:
                    self._register(lk)

    def on_control(self, session: Session, msg: control.Message) -> bool:
        """Messages servers send to agents; False when not one of these."""
        server = next((lk for lk in self.links if lk.session is session), None)
        if isinstance(msg, control.Registered):
            if server is not None:
                self._observed(server, msg.observed)
        elif isinstance(msg, control.Record):
            waiter = self._lookups.pop(msg.id, None) if msg.id is not None else None
            if waiter is not None:
                waiter.set(msg)
        elif isinstance(msg, control.Punch):
            if server is not None:  # only our own servers may ask us to connect out
                self.puncher.on_offer(msg)
        elif isinstance(msg, control.Incoming):
            if server is None:
                return True  # only our own servers may ask us to open circuits
            try:
                self._accept_circuit(server, msg.circuit, msg.from_node)
            except (EdgeMeshError, OSError) as e:
                log.info("circuit from %s via %s failed: %s", msg.from_node, server.address,
                         e)
        else:
            return False
        return True

    def lookup(self, node: str) -> PeerRecord | None:
        """The freshest server record for ``node`` (cached for RECORD_TTL seconds)."""
        rec = self.records.get(node)
        if rec and time.monotonic() - rec.fetched < RECORD_TTL:
            return rec
        for link in self.links:
            if not link.up:
                continue
            assert link.session is not None
            rid = next(self._ids)
            waiter = self._lookups[rid] = gevent.event.AsyncResult()
            try:
                link.session.send_control(control.Lookup(rid, node))
                msg = waiter.get(timeout=LOOKUP_TIMEOUT)
            except (gevent.Timeout, EdgeMeshError):
                self._lookups.pop(rid, None)
                continue
            if msg.found:
                rec = PeerRecord(node, msg.key, list(msg.addrs), msg.port, msg.public,
                                 msg.online, time.monotonic(), msg.nat)
                self.records[node] = rec
                return rec
        return rec

    def local_addresses(self) -> list[str]:
        from edgemesh.tunnel.addresses import local_ipv4
        host = self.node.listen_addr[0]
        own = [host] if host not in ("0.0.0.0", "::") else local_ipv4()
        return list(dict.fromkeys([*self.advertise, *own]))

    # ---- what status shows --------------------------------------------------------------------

    def path_view(self, node: str, path: str) -> dict[str, Any]:
        """``attempts``, ``next_attempt_in`` and a ``detail`` sentence for the peers view."""
        state = self.paths.get(node)
        if state is None:
            return {"attempts": [], "next_attempt_in": None, "detail": ""}
        upgrading = path == "relayed"
        return {"attempts": [a.view() for a in state.attempts],
                "next_attempt_in": state.next_in(time.monotonic()) if upgrading else None,
                "detail": state.detail(path)}
