"""The agent's side of the mesh: server links, peer lookup, and the path to each peer.

Paths to a node are tried in order (``PATHS``): direct — the peer's LAN addresses from its
registration, its Node object's addresses, its public address as a server saw it (attempts
staggered, first handshake wins) — then through a relay (each server link that is up). Hole
punching slots in between as one more ``PathStrategy`` (it needs the server's ``punch``
message and the shared local port, both already in place). A relayed peer is retried direct
in the background (``upgrade``); the first session that works replaces it for new streams.
"""
from __future__ import annotations

import itertools
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import gevent
import gevent.event

from edgemesh.config import split_host_port
from edgemesh.errors import EdgeMeshError, UnavailableError
from edgemesh.meta.store import Store
from edgemesh.runtime.tasks import spawn
from edgemesh.tunnel import frames as fr
from edgemesh.tunnel.node import TunnelNode, fmt_addr
from edgemesh.tunnel.records import SecureChannel
from edgemesh.tunnel.session import HANDSHAKE_TIMEOUT, Session, read_record

log = logging.getLogger(__name__)

DIRECT_STAGGER = 0.25
DIRECT_BUDGET = 2.5  # then the relay gets its turn (unanswered SYNs to a NAT just hang)
LOOKUP_TIMEOUT = 3.0
RECORD_TTL = 30.0
UPGRADE_PERIOD = 30.0


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


@dataclass
class ServerLink:
    """The long-lived control session to one rendezvous/relay server."""
    address: str
    session: Session | None = None
    observed: str = ""
    last_error: str = ""

    @property
    def up(self) -> bool:
        return self.session is not None and not self.session.closed


class PathStrategy(Protocol):
    name: str

    def connect(self, peers: "Peers", node: str, deadline: float) -> Session | None: ...


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
        self._dialing: dict[str, gevent.event.AsyncResult] = {}
        self._lookups: dict[int, gevent.event.AsyncResult] = {}
        self._ids = itertools.count(1)
        self._greenlets: list[gevent.Greenlet] = []

    def start(self) -> None:
        for link in self.links:
            self._greenlets.append(spawn(f"tunnel-server-{link.address}", self._link_loop,
                                         link))
        self._greenlets.append(spawn("tunnel-upgrade", self._upgrade_loop))

    def stop(self) -> None:
        for g in self._greenlets:
            g.kill(block=False)
        for sessions in list(self.sessions.values()):
            for s in list(sessions):
                s.close("shutting down")

    # ---- sessions -----------------------------------------------------------------------------

    def add(self, session: Session) -> None:
        self.sessions.setdefault(session.peer, []).insert(0, session)

    def removed(self, session: Session) -> None:
        sessions = self.sessions.get(session.peer, [])
        if session in sessions:
            sessions.remove(session)
        if not sessions:
            self.sessions.pop(session.peer, None)
        for link in self.links:
            if link.session is session:
                link.session = None

    def best(self, node: str) -> Session | None:
        """The preferred live session: direct before relayed, newest first."""
        live = [s for s in self.sessions.get(node, []) if not s.closed
                and not s.mux.goaway_received]
        live.sort(key=lambda s: s.path == "relayed")
        return live[0] if live else None

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

    def _dial(self, node: str, result: gevent.event.AsyncResult, deadline: float) -> None:
        errors = []
        try:
            for strategy in PATHS:
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
            self._dialing.pop(node, None)

    def adopt(self, sock: socket.socket, result: Any, reader: Any, *, initiator: bool,
              path: str, address: str) -> Session:
        session = self.make_session(sock, result, reader, initiator=initiator, path=path,
                                    address=address)
        self.add(session)
        session.start()
        return session

    # ---- direct -------------------------------------------------------------------------------

    def candidates(self, node: str) -> list[tuple[str, int]]:
        """Direct addresses of ``node`` in order: LAN, Node object, public."""
        rec = self.records.get(node)
        port = rec.port if rec and rec.port else self.listen_port
        out: list[tuple[str, int]] = []
        if rec:
            out += [(a, port) for a in rec.addrs]
        obj = self.store.node(node)
        if obj is not None:
            for kind in ("InternalIP", "ExternalIP"):
                out += [(a, port) for t, a in obj.addresses if t == kind]
        if rec and rec.public:
            try:
                out.append(split_host_port(rec.public))
            except ValueError:
                pass
        seen: set[tuple[str, int]] = set()
        return [c for c in out if not (c in seen or seen.add(c))]  # type: ignore[func-returns-value]

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
        answer = json.loads(frame.payload)
        if not answer.get("ok"):
            raise UnavailableError(f"relay {link.address} refused: {answer.get('reason')}")
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
                session.send_control({"op": "register", "addrs": self.local_addresses(),
                                      "port": self.listen_port})
                while not session.closed:
                    gevent.sleep(0.5)
                link.last_error = session.close_reason
            except (EdgeMeshError, OSError) as e:
                link.last_error = str(e)
                log.debug("server %s: %s", link.address, e)
            gevent.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def on_control(self, session: Session, msg: dict[str, Any]) -> bool:
        """Messages servers send to agents; False when not one of these."""
        op = msg.get("op")
        if op == "registered":
            for link in self.links:
                if link.session is session:
                    link.observed = str(msg.get("observed", ""))
        elif op == "record":
            waiter = self._lookups.pop(msg.get("id"), None)  # type: ignore[arg-type]
            if waiter is not None:
                waiter.set(msg)
        elif op == "incoming":
            server = next((lk for lk in self.links if lk.session is session), None)
            if server is None:
                return True  # only our own servers may ask us to open circuits
            try:
                self._accept_circuit(server, str(msg.get("circuit")), str(msg.get("from")))
            except (EdgeMeshError, OSError) as e:
                log.info("circuit from %s via %s failed: %s", msg.get("from"), server.address,
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
                link.session.send_control({"op": "lookup", "id": rid, "node": node})
                msg = waiter.get(timeout=LOOKUP_TIMEOUT)
            except (gevent.Timeout, EdgeMeshError):
                self._lookups.pop(rid, None)
                continue
            if msg.get("found"):
                rec = PeerRecord(node, str(msg.get("key", "")),
                                 [str(a) for a in msg.get("addrs", [])],
                                 int(msg.get("port") or 0), str(msg.get("public", "")),
                                 bool(msg.get("online")), time.monotonic())
                self.records[node] = rec
                return rec
        return rec

    def local_addresses(self) -> list[str]:
        from edgemesh.tunnel.addresses import local_ipv4
        host = self.node.listen_addr[0]
        own = [host] if host not in ("0.0.0.0", "::") else local_ipv4()
        return list(dict.fromkeys([*self.advertise, *own]))

    # ---- background upgrade -------------------------------------------------------------------

    def _upgrade_loop(self) -> None:
        while True:
            gevent.sleep(UPGRADE_PERIOD)
            for node, sessions in list(self.sessions.items()):
                if sessions and all(s.path == "relayed" for s in sessions):
                    try:
                        DIRECT.connect(self, node, time.monotonic() + 5)
                    except (EdgeMeshError, OSError):
                        pass


class DirectPath:
    name = "direct"

    def connect(self, peers: Peers, node: str, deadline: float) -> Session | None:
        peers.lookup(node)
        candidates = peers.candidates(node)
        if not candidates:
            return None
        winner: gevent.event.AsyncResult = gevent.event.AsyncResult()
        errors: list[str] = []

        def attempt(i: int, host: str, port: int) -> None:
            gevent.sleep(i * DIRECT_STAGGER)
            if winner.ready():
                return
            try:
                session = peers.dial_direct(node, host, port, deadline)
            except (EdgeMeshError, OSError, ValueError) as e:
                errors.append(f"{fmt_addr((host, port))}: {e}")
                if len(errors) == len(candidates):
                    winner.set(None)
                return
            if winner.ready():
                session.close("another path won")
            else:
                winner.set(session)

        workers = [spawn("tunnel-direct", attempt, i, h, p)
                   for i, (h, p) in enumerate(candidates)]
        try:
            budget = min(DIRECT_BUDGET, deadline - time.monotonic() - 1.0)
            session = winner.get(timeout=max(0.1, budget))
        except gevent.Timeout:
            session = None
        finally:
            for w in workers:
                w.kill(block=False)
        if session is None and errors:
            raise UnavailableError("; ".join(errors))
        return session  # type: ignore[no-any-return]


class RelayPath:
    name = "relay"

    def connect(self, peers: Peers, node: str, deadline: float) -> Session | None:
        errors = []
        for link in peers.links:
            if not link.up:
                continue
            try:
                return peers.dial_relayed(link, node, deadline)
            except (EdgeMeshError, OSError) as e:
                errors.append(f"{link.address}: {e}")
        if errors:
            raise UnavailableError("; ".join(errors))
        return None


DIRECT = DirectPath()
# The order paths are tried in; hole punching goes between DIRECT and the relay.
PATHS: list[PathStrategy] = [DIRECT, RelayPath()]
