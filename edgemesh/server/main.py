"""``edgemesh server``: rendezvous and relay for agents that cannot reach each other directly.

It is a tunnel node with role ``server``: agents hold a long-lived session to it and register
their addresses; it answers lookups, tells each agent the address it sees, and splices relay
circuits between two authenticated members (ciphertext only, per-peer limits). Name → key
bindings live in ``<stateDir>/bindings.json``; ``edgemesh server release NODE`` frees a name.
"""
from __future__ import annotations

import logging
import socket
import time

import gevent
import gevent.event

from edgemesh import __version__
from edgemesh.config import Config, split_host_port
from edgemesh.runtime import lifecycle, metrics
from edgemesh.runtime.admin import Admin
from edgemesh.runtime.lifecycle import StartFailed
from edgemesh.runtime.logs import Once
from edgemesh.runtime.tasks import spawn
from edgemesh.tunnel import control, identity
from edgemesh.tunnel.node import Accepted, TunnelNode
from edgemesh.tunnel.relay import RelayCore
from edgemesh.tunnel.session import Session
from edgemesh.tunnel.sessions import SERVER_LIVENESS

log = logging.getLogger(__name__)
_once = Once()

SESSIONS_REFUSED = metrics.counter("edgemesh_server_sessions_refused_total",
                                   "Agent sessions refused: maxSessions were open.")


class Server:
    """The server's node, relay core and sessions."""

    def __init__(self, config: Config) -> None:
        sc = config.server
        tc = config.modules.edgeTunnel
        name = config.nodeName or socket.gethostname()
        psk = identity.load_psk(tc.psk.path, tc.psk.enable)
        self.node = TunnelNode(name, "server", config.commonConfig.stateDir, psk,
                               "bindings.json")
        self.relay = RelayCore(sc.relayBytesPerSecond, sc.relayMaxCircuits,
                               sc.relayMaxCircuitsTotal, sc.relayIdleTimeout)
        self.listen = sc.listen
        self.max_sessions = sc.maxSessions
        self.sessions: set[Session] = set()
        self._monitor: gevent.Greenlet | None = None

    def start(self) -> tuple[str, int]:
        host, port = split_host_port(self.listen)
        addr = self.node.listen(host, port, self._on_accept)
        self._monitor = spawn("server-sessions", self._monitor_loop)
        return addr

    def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.kill(block=False)
        self.node.stop()
        self.relay.stop()
        for s in list(self.sessions):
            s.close("server shutting down")

    def _monitor_loop(self) -> None:
        """Close agent sessions gone silent: agents probe idle links every second, so a few
        seconds of silence means the agent's NAT mapping changed or it vanished. A stale
        session would otherwise hold the agent's 4-tuple and swallow its reconnection."""
        while True:
            gevent.sleep(1.0)
            SERVER_LIVENESS.check(list(self.sessions), time.monotonic(), Session.close)

    def _on_accept(self, acc: Accepted) -> None:
        if acc.result.remote_hello.intent == "circuit":
            self.relay.handle_circuit(acc)
            return
        if len(self.sessions) >= self.max_sessions:
            SESSIONS_REFUSED.inc()
            if _once("sessions"):
                log.warning("refused a session from %s (%s): %d sessions open (maxSessions; "
                            "logged once)", acc.result.remote_hello.node, acc.address,
                            len(self.sessions))
            acc.sock.close()
            return
        session = Session(acc.sock, acc.result, acc.reader, initiator=False,
                          local_hello=self.node.hello(), path="direct", address=acc.address,
                          max_inbound=0, on_stream=None, on_control=self._on_control,
                          on_close=self._on_close, answer_unknown=True)
        self.sessions.add(session)
        session.start()

    def _on_control(self, session: Session, msg: control.Message) -> None:
        if not self.relay.on_control(session, msg):
            rid = getattr(msg, "id", None)
            session.send_control(control.Error(rid if isinstance(rid, int) else None,
                                               f"unknown op {msg.op!r}"))

    def _on_close(self, session: Session) -> None:
        self.sessions.discard(session)
        self.relay.on_session_closed(session)

    def bindings_view(self) -> list[dict[str, str]]:
        return [{"node": b.node, "key": b.key} for b in self.node.bindings.all()]


class _Serving:
    """The server as ``lifecycle.serve`` runs it."""

    def __init__(self, server: Server, listen: str) -> None:
        self.server, self.listen = server, listen

    def start(self) -> None:
        try:
            host, port = self.server.start()
        except OSError as e:
            raise StartFailed(f"cannot listen on {self.listen}: {e}") from e
        node = self.server.node
        log.info("edgemesh server %s listening on %s:%d as %s (key %s)", __version__, host,
                 port, node.name, node.public_key.hex()[:16])

    def stop(self) -> None:
        self.server.stop()


def run(config: Config) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    server = Server(config)
    admin = Admin()
    admin.add_view("registrations", server.relay.records)
    admin.add_view("bindings", server.bindings_view)
    admin.add_view("node", lambda: {"node": server.node.name, "role": "server",
                                    "version": __version__, "synced": True, "stale": ""})
    return lifecycle.serve("server", admin, config.commonConfig.adminAddress,
                           _Serving(server, config.server.listen))


def release(state_dir: str, node: str) -> int:
    """``edgemesh server release NODE``: free NODE's name binding (the operator's action)."""
    if identity.release_binding(state_dir, node):
        print(f"released {node}: the next key it proves will be bound")
        return 0
    print(f"{node} is not bound")
    return 1
