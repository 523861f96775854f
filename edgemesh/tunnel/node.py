"""A tunnel endpoint: identity, the listener, and authenticated connections in and out.

Agents and servers both are a ``TunnelNode``; they differ in the handlers they give it. The
listener and every outgoing connection towards peers and servers share one local port
(``SO_REUSEADDR`` + ``SO_REUSEPORT``): NATs that keep a mapping per inner address:port then
show peers the same public port that the servers see, which is what hole punching (next step
on the path list, see ``peers``) relies on.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import gevent
import gevent.pool

from edgemesh.errors import EdgeMeshError
from edgemesh.runtime import metrics
from edgemesh.runtime.backoff import AcceptBackoff, is_resource_error
from edgemesh.runtime.logs import Once
from edgemesh.runtime.tasks import spawn
from edgemesh.tunnel import identity
from edgemesh.tunnel.frames import INITIAL_WINDOW
from edgemesh.tunnel.handshake import Hello, Result, public_bytes
from edgemesh.tunnel.records import RecordReader
from edgemesh.tunnel.session import HANDSHAKE_TIMEOUT, handshake_over

log = logging.getLogger(__name__)
_once = Once()

HANDSHAKES = metrics.counter("edgemesh_tunnel_handshakes_total",
                             "Tunnel handshakes by direction and result.",
                             ["direction", "result"])
MAX_PENDING_HANDSHAKES = 256


class PeerRefused(EdgeMeshError):
    """The peer authenticated but may not connect (bound name, wrong node, not allowed)."""


@dataclass
class Accepted:
    """An authenticated inbound connection, ready for a Session or a relay circuit."""
    sock: socket.socket
    result: Result
    reader: RecordReader
    address: str


AcceptHandler = Callable[[Accepted], None]


def reuse_socket(family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def fmt_addr(addr: tuple[str, int]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TunnelNode:
    """Identity plus listener; ``connect`` dials out from the shared port and authenticates."""

    def __init__(self, name: str, role: str, state_dir: str, psk: bytes,
                 bindings_file: str, window: int = INITIAL_WINDOW) -> None:
        self.name = name
        self.role = role
        self.static = identity.load_or_create_key(state_dir)
        self.public_key = public_bytes(self.static)
        self.psk = psk
        self.bindings = identity.Bindings(os.path.join(state_dir, bindings_file))
        self.window = window
        self.listen_addr: tuple[str, int] = ("0.0.0.0", 0)
        self._listener: socket.socket | None = None
        self._acceptor: gevent.Greenlet | None = None
        self._handshakes = gevent.pool.Pool(MAX_PENDING_HANDSHAKES)
        self._on_accept: AcceptHandler | None = None
        # remote address -> taker: a hole punch expects this peer's connection (it runs its
        # own handshake, with the role the punch decides, not the listener's responder role)
        self.claims: dict[tuple[str, int], Callable[[socket.socket], None]] = {}

    def hello(self, intent: str = "session", **extra: object) -> Hello:
        # "port": our tunnel port, so a peer that only ever saw our connections knows where
        # to dial us back without asking a server (docs/tunnel-protocol.md §8.1)
        return Hello(self.name, self.role, intent, self.window,
                     {"port": self.listen_addr[1], **extra})

    # ---- listening ----------------------------------------------------------------------------

    def listen(self, host: str, port: int, on_accept: AcceptHandler) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = reuse_socket(family)
        sock.bind((host, port))
        sock.listen(1024)
        self._on_accept = on_accept
        self._listener = sock
        self.listen_addr = sock.getsockname()[:2]
        self._acceptor = spawn("tunnel-accept", self._accept_loop)
        return self.listen_addr

    def stop(self) -> None:
        if self._acceptor is not None:
            self._acceptor.kill(block=False)
        if self._listener is not None:
            self._listener.close()
        self._handshakes.kill(block=False)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        backoff = AcceptBackoff()
        while True:
            try:
                sock, addr = self._listener.accept()
            except OSError as e:
                if _once(("accept", e.errno)):
                    log.warning("tunnel accept failed: %s", e)
                gevent.sleep(backoff.delay() if is_resource_error(e) else 0.01)
                continue
            backoff.reset()
            claim = self.claims.pop(addr[:2], None)
            if claim is not None:
                spawn("tunnel-claimed", claim, sock)
                continue
            if self._handshakes.full():
                HANDSHAKES.labels("in", "overloaded").inc()
                sock.close()
                continue
            self._handshakes.spawn(self._handle, sock, addr)

    def _handle(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        try:
            result, reader = handshake_over(sock, False, self.static, self.psk, self.hello())
        except (EdgeMeshError, OSError, ValueError) as e:
            HANDSHAKES.labels("in", "failed").inc()
            log.debug("inbound handshake from %s failed: %s", fmt_addr(addr), e)
            sock.close()
            return
        peer = result.remote_hello.node
        if not self.bindings.check(peer, result.remote_static):
            HANDSHAKES.labels("in", "bound_to_other_key").inc()
            log.warning("refused %s from %s: the name is bound to another key", peer,
                        fmt_addr(addr))
            sock.close()
            return
        HANDSHAKES.labels("in", "ok").inc()
        assert self._on_accept is not None
        # out of the handshake pool: sessions and relay circuits live long
        spawn("tunnel-accepted", self._run_accepted,
              Accepted(sock, result, reader, fmt_addr(addr)))

    def _run_accepted(self, acc: Accepted) -> None:
        assert self._on_accept is not None
        try:
            self._on_accept(acc)
        except BaseException:
            acc.sock.close()
            raise

    # ---- dialing ------------------------------------------------------------------------------

    def dial(self, host: str, port: int, timeout: float, *, shared_port: bool = True,
             ) -> socket.socket:
        """A TCP connection to host:port, from the listening port when ``shared_port``."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = reuse_socket(family) if shared_port else socket.socket(family,
                                                                      socket.SOCK_STREAM)
        try:
            if shared_port and self.listen_addr[1]:
                try:
                    sock.bind(self.listen_addr)
                except OSError:
                    sock.close()
                    sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect((host, port))
            except OSError as e:
                if e.errno not in (errno.EADDRNOTAVAIL, errno.EADDRINUSE) or not shared_port:
                    raise
                sock.close()  # this 4-tuple is still in TIME_WAIT: use an ephemeral port
                return self.dial(host, port, timeout, shared_port=False)
            return sock
        except BaseException:
            sock.close()
            raise

    def authenticate(self, sock: socket.socket, hello: Hello, expect: str | None,
                     timeout: float = HANDSHAKE_TIMEOUT,
                     reader: RecordReader | None = None, initiator: bool = True,
                     ) -> tuple[Result, RecordReader]:
        """Handshake on a connected socket and check the peer is ``expect`` with its bound key."""
        try:
            result, reader = handshake_over(sock, initiator, self.static, self.psk, hello,
                                            timeout, reader)
        except BaseException:
            HANDSHAKES.labels("out", "failed").inc()
            raise
        peer = result.remote_hello.node
        if expect is not None and peer != expect:
            HANDSHAKES.labels("out", "wrong_node").inc()
            raise PeerRefused(f"expected node {expect!r}, the peer is {peer!r}")
        if not self.bindings.check(peer, result.remote_static):
            HANDSHAKES.labels("out", "bound_to_other_key").inc()
            raise PeerRefused(f"node {peer!r} proved a key other than the one bound to it")
        HANDSHAKES.labels("out", "ok").inc()
        return result, reader
