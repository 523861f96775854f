"""An agent's links to its rendezvous/relay servers: registration, what the servers observe
of this node (its public address, the NAT in front of it), lookups of other nodes' records,
and the control messages servers send (punch offers, incoming circuits are handed on)."""
from __future__ import annotations

import ipaddress
import itertools
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
import gevent.event

from edgemesh.config import EdgeTunnel, split_host_port
from edgemesh.errors import EdgeMeshError
from edgemesh.runtime.tasks import spawn
from edgemesh.tunnel import control, punch
from edgemesh.tunnel.node import TunnelNode
from edgemesh.tunnel.session import HANDSHAKE_TIMEOUT, Session
from edgemesh.tunnel.sessions import close_now

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 3.0
RECORD_TTL = 30.0
RELINK_AFTER = 20.0  # a server link from another port (tunnel port's 4-tuple in TIME_WAIT)

Adopt = Callable[..., Session]  # (sock, result, reader, *, initiator, path, address)


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


class ServerLinks:
    """Every server link of this agent, and what they tell it."""

    def __init__(self, node: TunnelNode, servers: list[str], listen_port: int,
                 advertise: list[str], adopt: Adopt,
                 on_punch: Callable[[control.Punch], None],
                 on_incoming: Callable[[ServerLink, control.Incoming], None]) -> None:
        self.node = node
        self.links = [ServerLink(s) for s in servers]
        self.listen_port = listen_port
        self.advertise = advertise
        self.adopt = adopt
        self.on_punch = on_punch
        self.on_incoming = on_incoming
        self.records: dict[str, PeerRecord] = {}
        self.nat = punch.NatKind.UNKNOWN
        self.hole_punching = True
        self._lookups: dict[int, gevent.event.AsyncResult] = {}
        self._ids = itertools.count(1)

    def start(self) -> list[gevent.Greenlet]:
        return [spawn(f"tunnel-server-{link.address}", self._link_loop, link)
                for link in self.links]

    def next_id(self) -> int:
        return next(self._ids)

    def is_link(self, session: Session) -> bool:
        return any(link.session is session for link in self.links) \
            or session.peer_hello.role == "server"

    def forget(self, session: Session) -> bool:
        """``session`` closed: True when it was one of our server links."""
        was_link = False
        for link in self.links:
            if link.session is session:
                link.session, was_link = None, True
        return was_link

    def sessions(self) -> list[Session]:
        return [lk.session for lk in self.links if lk.session is not None]

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
                self.on_punch(msg)
        elif isinstance(msg, control.Incoming):
            if server is not None:  # only our own servers may ask us to open circuits
                self.on_incoming(server, msg)
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
            rid = self.next_id()
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

    def local_addresses(self) -> list[str]:
        from edgemesh.tunnel.addresses import local_ipv4
        host = self.node.listen_addr[0]
        own = [host] if host not in ("0.0.0.0", "::") else local_ipv4()
        return list(dict.fromkeys([*self.advertise, *own]))


def circuit_socket(node: TunnelNode, link: ServerLink, timeout: float) -> socket.socket:
    """A fresh connection to ``link``'s server for one relay circuit (not the tunnel port)."""
    host, port = split_host_port(link.address)
    return node.dial(host, port, timeout, shared_port=False)


def relay_plan(tunnel: EdgeTunnel, node_name: str, may_relay: bool = True
               ) -> tuple[bool, list[str], list[str]]:
    """``(relay, servers, advertiseAddresses)`` for ``node_name`` with ``relayNodes`` applied.

    As in the Go EdgeMesh: a node listed in ``relayNodes`` relays (agents only: ``may_relay``)
    and advertises its listed addresses; every other listed relay's addresses become tunnel
    servers, at ``listenPort`` unless an address gives its own port.
    """
    relay, servers = tunnel.relay, list(tunnel.servers)
    advertise = list(tunnel.advertiseAddresses)
    for node in tunnel.relayNodes:
        if node.nodeName == node_name and may_relay:
            relay = True
            advertise.extend(split_host_port(a)[0] if _has_port(a) else a
                             for a in node.advertiseAddress)
        elif node.nodeName != node_name:
            servers.extend(a if _has_port(a) else _join_host_port(a, tunnel.listenPort)
                           for a in node.advertiseAddress)
    return relay, list(dict.fromkeys(servers)), list(dict.fromkeys(advertise))


def _has_port(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
        return False  # a bare IPv6 address has colons but no port
    except ValueError:
        pass
    try:
        split_host_port(address)
    except ValueError:
        return False
    return True


def _join_host_port(host: str, number: int) -> str:
    return f"[{host}]:{number}" if ":" in host else f"{host}:{number}"
