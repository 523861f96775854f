"""The edgeTunnel module: the way the dialer reaches other nodes (``Context.tunnel``), the
receiving-side policy, server links, the optional relay, and the ``peers`` view / ``tunnel``
check.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from edgemesh.context import Context, Role
from edgemesh.errors import LocalProtocolError, UnavailableError
from edgemesh.runtime import metrics
from edgemesh.runtime.logs import Once
from edgemesh.tunnel import control, identity
from edgemesh.tunnel import frames as fr
from edgemesh.tunnel.links import relay_plan
from edgemesh.tunnel.node import Accepted, TunnelNode
from edgemesh.tunnel.peers import Peers
from edgemesh.tunnel.policy import REFUSED, LocalEndpoints
from edgemesh.tunnel.pumps import (
    AttachedStream,
    TunnelDatagrams,
    serve_tcp,
    serve_udp,
    stream_socket,
)
from edgemesh.tunnel.relay import RelayCore
from edgemesh.tunnel.session import Session
from edgemesh.tunnel.stream import Stream

log = logging.getLogger(__name__)
_once = Once()

STREAMS_OPENED = metrics.counter("edgemesh_tunnel_streams_opened_total",
                                 "Streams this node opened to peers, by protocol.", ["proto"])
STREAMS_SERVED = metrics.counter("edgemesh_tunnel_streams_served_total",
                                 "Streams peers opened that this node served, by protocol.",
                                 ["proto"])
PEER_STREAMS = metrics.gauge("edgemesh_tunnel_peer_streams", "Open streams, by peer.", ["peer"])
PEER_RTT = metrics.gauge("edgemesh_tunnel_peer_rtt_seconds", "Keepalive round trip, by peer.",
                         ["peer"])
PEER_UP = metrics.gauge("edgemesh_tunnel_peer_up", "1 per live session, by peer and path.",
                        ["peer", "path"])
RELAY_UP = metrics.gauge("edgemesh_tunnel_servers_up", "Server links that are up.")


class TunnelModule:
    """Implements the proxy's ``TunnelDialer``: ``open_stream``, ``open_datagram`` and the
    optional ``attach_stream``."""
    name = "edgeTunnel"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        cfg = ctx.config.modules.edgeTunnel
        self.cfg = cfg
        psk = identity.load_psk(cfg.psk.path, cfg.psk.enable)
        self.node = TunnelNode(ctx.node_name, "agent", ctx.state_dir, psk, "peers.json")
        self.policy = LocalEndpoints(ctx.store, ctx.node_name,
                                     pods=ctx.config.modules.edgeCNI.enable)
        relay, servers, advertise = relay_plan(cfg, ctx.node_name, may_relay=ctx.role is Role.AGENT)
        if cfg.relayNodes:
            log.info("relayNodes: %s; servers %s", "this node relays, advertising "
                     f"{', '.join(advertise) or 'its own addresses'}" if relay
                     else "this node does not relay", ", ".join(servers) or "none")
        self.relay = RelayCore(cfg.relayBytesPerSecond, cfg.relayMaxCircuits,
                               cfg.relayMaxCircuitsTotal, cfg.relayIdleTimeout) \
            if relay else None
        self.peers = Peers(self.node, ctx.store, servers, cfg.listenPort, advertise,
                           self._make_session)
        self.connect_timeout = ctx.config.modules.edgeProxy.connectTimeout
        self.udp_idle = ctx.config.modules.edgeProxy.udpIdleTimeout

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        host, port = self.node.listen(self.cfg.listenAddress, self.cfg.listenPort,
                                      self._on_accept)
        log.info("tunnel listening on %s:%d as %s (key %s)", host, port, self.node.name,
                 self.node.public_key.hex()[:16])
        self.peers.servers.listen_port = port
        self.peers.servers.hole_punching = self.cfg.holePunching
        if self.relay is not None:
            relay = self.relay
            self.peers.is_client = lambda s: getattr(relay.registry.get(s.peer), "session",
                                                     None) is s
        self.peers.start()
        RELAY_UP.fn = lambda: sum(link.up for link in self.peers.links)
        self.ctx.admin.add_view("peers", self.view)
        self.ctx.admin.add_check("tunnel", self.check)
        if self.relay is not None:
            self.ctx.admin.add_view("relay", self.relay.records)

    def stop(self) -> None:
        self.node.stop()
        self.peers.stop()
        if self.relay is not None:
            self.relay.stop()

    def check(self) -> str:
        if not self.peers.links or any(link.up for link in self.peers.links):
            return ""
        errors = "; ".join(f"{lk.address}: {lk.last_error or 'connecting'}"
                           for lk in self.peers.links)
        return f"no relay server reachable ({errors})"

    # ---- the dialer's interface ---------------------------------------------------------------

    def open_stream(self, node: str, proto: str, ip: str, port: int,
                    timeout: float | None) -> socket.socket:
        """A socket connected (through node's agent) to ip:port on ``node``."""
        if proto.lower() != "tcp":
            raise UnavailableError(f"open_stream: unsupported protocol {proto}")
        stream = self._open(node, fr.Target(fr.Proto.TCP, ip, port), timeout)
        STREAMS_OPENED.labels("tcp").inc()
        return stream_socket(stream)

    def attach_stream(self, node: str, proto: str, ip: str, port: int,
                      client: socket.socket, timeout: float | None, *,
                      on_end: Callable[[], None] | None = None,
                      on_bytes: Callable[[int, int], None] | None = None) -> AttachedStream:
        """Open a stream to ip:port on ``node`` and pump ``client`` to and from it ourselves
        (the proxy's TCP path: no socketpair hop). Raises UnavailableError like
        ``open_stream``, with ``client`` untouched; see ``pumps.AttachedStream`` after."""
        if proto.lower() != "tcp":
            raise UnavailableError(f"attach_stream: unsupported protocol {proto}")
        stream = self._open(node, fr.Target(fr.Proto.TCP, ip, port), timeout)
        STREAMS_OPENED.labels("tcp").inc()
        try:
            attached = AttachedStream(stream, client, on_end)
        except OSError as e:  # the client went away meanwhile (closed descriptor)
            stream.reset(fr.ResetCode.CANCEL)
            raise UnavailableError(f"attach_stream: {e}") from e
        stream.on_bytes = on_bytes
        return attached

    def open_datagram(self, node: str, ip: str, port: int) -> TunnelDatagrams:
        stream = self._open(node, fr.Target(fr.Proto.UDP, ip, port), self.connect_timeout)
        STREAMS_OPENED.labels("udp").inc()
        return TunnelDatagrams(stream)

    def _open(self, node: str, target: fr.Target, timeout: float | None) -> Stream:
        timeout = self.connect_timeout if timeout is None else timeout
        session = self.peers.session_for(node, timeout)
        try:
            return session.open_stream(target, timeout)
        except LocalProtocolError as e:  # the peer sent GOAWAY since: callers move on
            raise UnavailableError(f"stream to {node}: {e}") from e

    # ---- sessions -----------------------------------------------------------------------------

    def _make_session(self, sock: socket.socket, result: Any, reader: Any, *, initiator: bool,
                      path: str, address: str) -> Session:
        session = Session(sock, result, reader, initiator=initiator,
                          local_hello=self.node.hello(), path=path, address=address,
                          max_inbound=self.cfg.maxStreamsPerPeer, on_stream=self._on_stream,
                          on_control=self._on_control, on_close=self._on_close)
        PEER_UP.labels(session.peer, path).inc()
        PEER_STREAMS.labels(session.peer).fn = lambda p=session.peer: sum(
            s.stream_count for s in self.peers.table.sessions.get(p, []))
        PEER_RTT.labels(session.peer).fn = lambda p=session.peer: (
            (self.peers.best(p) or session).rtt or 0.0)
        return session

    def _on_accept(self, acc: Accepted) -> None:
        hello = acc.result.remote_hello
        if hello.intent == "circuit":
            if self.relay is None:
                acc.sock.close()
                return
            self.relay.handle_circuit(acc)
            return
        self.peers.adopt(acc.sock, acc.result, acc.reader, initiator=False, path="direct",
                         address=acc.address)

    def _on_close(self, session: Session) -> None:
        PEER_UP.labels(session.peer, session.path).dec()
        self.peers.removed(session)
        if self.relay is not None:
            self.relay.on_session_closed(session)

    def _on_control(self, session: Session, msg: control.Message) -> None:
        if self.peers.servers.on_control(session, msg):
            return
        if self.relay is not None and self.relay.on_control(session, msg):
            return
        if isinstance(msg, control.Register | control.Lookup):
            rid = msg.id if isinstance(msg, control.Lookup) else None
            session.send_control(control.Error(rid, "this agent is not a relay"))

    def _on_stream(self, session: Session, stream: Stream) -> None:
        target = stream.target
        if not self.policy.allows(target):
            REFUSED.labels("not_local_endpoint").inc()
            if _once(("refused", session.peer, target.ip)):
                log.info("refused stream from %s to %s %s:%d: not an endpoint or Pod on this "
                         "node", session.peer, target.proto.name, target.ip, target.port)
            stream.reset(fr.ResetCode.NOT_LOCAL, "not an endpoint or Pod on this node")
            return
        STREAMS_SERVED.labels(target.proto.name.lower()).inc()
        if target.proto is fr.Proto.TCP:
            serve_tcp(stream, self.connect_timeout)
        else:
            serve_udp(stream, self.udp_idle)

    # ---- visibility ---------------------------------------------------------------------------

    def view(self) -> list[dict[str, Any]]:
        """One item per session (the one new streams use first, ``active``), plus each peer's
        path attempts and next upgrade (``Peers.path_view``); server links that are down."""
        out = []
        for node in sorted(set(self.peers.table.sessions) | set(self.peers.paths)):
            best = self.peers.best(node)
            sessions = sorted(self.peers.table.sessions.get(node, []), key=lambda s: s is not best)
            for s in sessions:
                item = {"node": node, "path": s.path, "address": s.address,
                        "rtt_ms": round(s.rtt * 1000, 3) if s.rtt is not None else None,
                        "streams": s.stream_count, "bytes_in": s.bytes_in,
                        "bytes_out": s.bytes_out, "key": s.peer_key.hex()[:16],
                        "active": s is best, **self.peers.path_view(node, s.path)}
                if self.peers.servers.is_link(s):
                    item["detail"] = "server"
                elif s is not best:
                    item["detail"] = "draining"
                out.append(item)
            if not sessions and node in self.peers.paths:
                out.append({"node": node, "path": "none", "address": "", "rtt_ms": None,
                            "streams": 0, "bytes_in": 0, "bytes_out": 0, "active": False,
                            **self.peers.path_view(node, "none")})
        for link in self.peers.links:
            if not link.up:
                out.append({"node": link.address, "path": "down", "address": link.address,
                            "rtt_ms": None, "streams": 0, "bytes_in": 0, "bytes_out": 0,
                            "detail": f"server: {link.last_error or 'connecting'}"})
        return out


def build(ctx: Context) -> TunnelModule:
    os.makedirs(ctx.state_dir, mode=0o700, exist_ok=True)
    return TunnelModule(ctx)

