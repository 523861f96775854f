"""The agent's side of the mesh: the path to each peer, kept up.

Paths to a node are tried in order (``paths.PATHS``): direct — the peer's LAN addresses from its
registration, its Node object's addresses, then a hole punch coordinated by a server (or, when
punching cannot work, a plain dial to its public address); attempts staggered, first
handshake wins — then through a relay (each server link that is up).

While running (``monitor``, twice a second): sessions silent for too long are closed
(``sessions.AGENT_LIVENESS``: a lost NAT mapping shows as silence, not as an error); a peer
that lost its last session is reconnected through a relay at once, then upgraded; a relayed
peer is retried direct with backoff (``punch.PathState``); once a direct session exists,
relayed ones drain (GOAWAY, closed when idle); duplicate sessions to one peer are retired by
the side with the smaller name (``sessions.SessionTable``). Server links are ``links``;
punching itself is ``punching``.
"""
from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

from edgemesh.config import split_host_port
from edgemesh.errors import EdgeMeshError, RemoteProtocolError, UnavailableError
from edgemesh.meta.store import Store
from edgemesh.runtime.tasks import spawn
from edgemesh.tunnel import control, punch
from edgemesh.tunnel import frames as fr
from edgemesh.tunnel.links import PeerRecord, ServerLink, ServerLinks, circuit_socket
from edgemesh.tunnel.node import TunnelNode, fmt_addr
from edgemesh.tunnel.paths import DIRECT, PATHS, PUNCH_BUDGET, RELAY, PathStrategy
from edgemesh.tunnel.punching import Puncher
from edgemesh.tunnel.records import SecureChannel
from edgemesh.tunnel.session import HANDSHAKE_TIMEOUT, Session, read_record
from edgemesh.tunnel.sessions import AGENT_LIVENESS, SessionTable, close_now

log = logging.getLogger(__name__)

MONITOR_PERIOD = 0.5
RECOVER_DEFER = 2.0  # the larger-named side lets the smaller one reconnect first
MAX_SEEN = 4096


class Peers:
    """Dialing along the path list, recovery and upgrades; satisfies ``paths.PathContext``."""

    def __init__(self, node: TunnelNode, store: Store, servers: list[str], listen_port: int,
                 advertise: list[str], make_session: Callable[..., Session]) -> None:
        self.node = node
        self.store = store
        self.make_session = make_session
        self.servers = ServerLinks(node, servers, listen_port, advertise, self.adopt,
                                   self._on_punch, self._on_incoming)
        self.table = SessionTable(node.name, self.servers.is_link)
        self.paths: dict[str, punch.PathState] = {}
        self.seen: dict[str, tuple[str, int]] = {}  # node -> (ip, tunnel port) of a direct peer
        self.puncher = Puncher(node, self.state, self.adopt)
        self._upgrading: set[str] = set()
        self._dialing: dict[str, gevent.event.AsyncResult] = {}
        self._greenlets: list[gevent.Greenlet] = []
        self._stopping = False
        # set by a relaying agent: True for a session a node registered on with us (our
        # client, not a peer we need a path to)
        self.is_client: Callable[[Session], bool] = lambda s: False

    @property
    def links(self) -> list[ServerLink]:
        return self.servers.links

    def start(self) -> None:
        self._greenlets += self.servers.start()
        self._greenlets.append(spawn("tunnel-paths", self._monitor_loop))

    def stop(self) -> None:
        self._stopping = True
        for g in self._greenlets:
            g.kill(block=False)
        for s in self.table.all():
            s.close("shutting down")

    def state(self, node: str) -> punch.PathState:
        return self.paths.setdefault(node, punch.PathState())

    def lookup(self, node: str) -> PeerRecord | None:
        return self.servers.lookup(node)

    def punch_link(self, node: str) -> tuple[ServerLink | None, str]:
        return self.servers.punch_link(node)

    def best(self, node: str) -> Session | None:
        return self.table.best(node)

    # ---- sessions -----------------------------------------------------------------------------

    def add(self, session: Session) -> None:
        self.table.add(session)
        if self.servers.is_link(session):
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
        intended = self.table.remove(session)
        was_link = self.servers.forget(session)
        if not (intended or was_link or self._stopping or self.table.best(session.peer)
                or self.is_client(session)):
            self._lost(session)

    def session_for(self, node: str, timeout: float) -> Session:
        """A session to ``node``, connecting along the path list (one dial per node at once)."""
        existing = self.table.best(node)
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
        if self.table.best(node) is not None or node in self._dialing:
            return
        pending = self._dialing[node] = gevent.event.AsyncResult()
        self._dial(node, pending, time.monotonic() + 8.0, order)
        if pending.successful():
            log.info("reconnected to %s (%s)", node, pending.value.path)

    def _monitor_loop(self) -> None:
        while True:
            gevent.sleep(MONITOR_PERIOD)
            now = time.monotonic()
            sessions = self.table.all()
            sessions += [s for s in self.servers.sessions() if s not in sessions]
            AGENT_LIVENESS.check(sessions, now, close_now)
            self.table.close_retired(now)
            for node in list(self.table.sessions):
                self.table.tidy(node)
                self._maybe_upgrade(node, now)

    def _maybe_upgrade(self, node: str, now: float) -> None:
        best = self.table.best(node)
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
            self.servers.records.pop(node, None)  # the peer's NAT or address may have changed
            session = DIRECT.connect(self, node, time.monotonic() + PUNCH_BUDGET + 1.0)
        except (EdgeMeshError, OSError):
            session = None
        finally:
            self._upgrading.discard(node)
        if session is None:
            self.state(node).upgrade_failed(time.monotonic())
        else:
            log.info("upgraded %s to a %s path (%s)", node, session.path, session.address)

    # ---- what servers ask of us ---------------------------------------------------------------

    def _on_punch(self, msg: control.Punch) -> None:
        self.puncher.on_offer(msg)

    def _on_incoming(self, link: ServerLink, msg: control.Incoming) -> None:
        try:
            self._accept_circuit(link, msg.circuit, msg.from_node)
        except (EdgeMeshError, OSError) as e:
            log.info("circuit from %s via %s failed: %s", msg.from_node, link.address, e)

    # ---- direct -------------------------------------------------------------------------------

    def candidates(self, node: str) -> list[tuple[str, str, int]]:
        """Direct addresses of ``node`` in order, with their kind: lan (registered, or seen on
        a direct session), node (its Node object), public."""
        rec = self.servers.records.get(node)
        came_from = self.seen.get(node)
        port = rec.port if rec and rec.port else \
            came_from[1] if came_from else self.servers.listen_port
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

    def punch_tcp(self, link: ServerLink, node: str, deadline: float) -> Session:
        return self.puncher.request(link, node, self.servers.next_id(), deadline)

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
        rec = self.servers.records.get(node)
        if rec and rec.key and rec.key != key.hex():
            raise UnavailableError(f"{node} proved a key other than its server record's")

    # ---- relay --------------------------------------------------------------------------------

    def dial_relayed(self, link: ServerLink, node: str, deadline: float) -> Session:
        timeout = max(0.1, min(HANDSHAKE_TIMEOUT, deadline - time.monotonic()))
        sock = circuit_socket(self.node, link, timeout)
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
        sock = circuit_socket(self.node, link, HANDSHAKE_TIMEOUT)
        try:
            leftover = self._open_circuit(sock, link, {"accept": token}, HANDSHAKE_TIMEOUT)
            result, reader = self.node.authenticate(sock, self.node.hello(), from_node,
                                                    reader=leftover, initiator=False)
        except BaseException:
            sock.close()
            raise
        self.adopt(sock, result, reader, initiator=False, path="relayed",
                   address=f"via {link.address}")

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
