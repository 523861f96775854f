"""THE dialer: how every part of EdgeMesh reaches an endpoint (proxy, gateway, HTTP layer).

Contract (other modules rely on it exactly):

    class Dialer:
        def __init__(self, node_name: str, connect_timeout: float)
        tunnel: TunnelDialer | None     # set by Context.attach_tunnel once the tunnel is built
        def dial_tcp(self, backend, timeout=None) -> socket.socket
        def open_udp(self, backend) -> DatagramChannel

- ``dial_tcp``: an endpoint on this node (``backend.node_name`` empty or ours), or any endpoint
  while there is no tunnel, gets a plain numeric connect — ``socket.socket`` + ``connect``, never
  ``create_connection``, so no resolver is involved. Any other endpoint is asked of the tunnel:
  ``tunnel.open_stream(node, "tcp", ip, port, timeout)`` returns a real ``socket.socket``
  (possibly one end of a socketpair). Both return a cooperative (gevent) socket.
- ``open_udp``: local → a connected UDP socket wrapped as a ``DatagramChannel``; remote →
  ``tunnel.open_datagram(node, ip, port)``, any object with ``send(bytes)``, ``recv() -> bytes``
  and ``close()``, boundaries kept.
- Every failure to reach the endpoint (refused, timed out, unreachable, tunnel down) raises
  ``edgemesh.errors.UnavailableError``, so callers move on to the next endpoint.

The proxy's TCP fast path uses ``is_local`` and ``start_connect`` to connect without a greenlet;
it falls back to ``dial_tcp`` in a greenlet for remote endpoints.

Optional extension of ``TunnelDialer`` (the proxy's TCP path uses it when the tunnel has it;
``open_stream`` stays for callers that need a socket: the gateway, HTTP pools):

    def attach_stream(self, node, protocol, ip, port, client, timeout, *,
                      on_end=None, on_bytes=None) -> handle

  opens the stream like ``open_stream`` (same errors, ``client`` untouched on failure), then
  pumps ``client`` (a connected stream socket) to and from it itself, on its own duplicate of
  the descriptor: no socketpair hop. Half-closes cross both ways; a reset on either side
  resets the client (RST). ``on_end()`` is called once when the stream is over,
  ``on_bytes(up, down)`` whenever bytes moved (from the client, to the client). The handle
  has ``close()`` (abort: reset the stream, stop pumping, never blocks) and
  ``setsockopt(level, option, value)`` (on the client socket).
"""
from __future__ import annotations

import _socket
import errno
import socket
from typing import Protocol

from edgemesh.errors import UnavailableError
from edgemesh.meta.store import Backend

UDP_RECV_SIZE = 65535


class DatagramChannel(Protocol):
    """A datagram path to one endpoint: one ``send`` is one datagram, ``recv`` returns one."""

    def send(self, data: bytes) -> None: ...

    def recv(self) -> bytes: ...

    def close(self) -> None: ...


class TunnelDialer(Protocol):
    """What the tunnel module provides (``Context.tunnel``)."""

    def open_stream(self, node: str, protocol: str, ip: str, port: int,
                    timeout: float | None) -> socket.socket: ...

    def open_datagram(self, node: str, ip: str, port: int) -> DatagramChannel: ...


class UDPChannel:
    """A connected UDP socket to a local endpoint."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as e:
            raise UnavailableError(f"udp send: {e.strerror}") from e

    def recv(self) -> bytes:
        try:
            return self.sock.recv(UDP_RECV_SIZE)
        except OSError as e:  # ICMP port unreachable surfaces here as ECONNREFUSED
            raise UnavailableError(f"udp recv: {e.strerror}") from e

    def close(self) -> None:
        self.sock.close()


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


class Dialer:
    """Connects to endpoints, locally or through the tunnel (see the module docstring)."""

    def __init__(self, node_name: str, connect_timeout: float) -> None:
        self.node_name = node_name
        self.connect_timeout = connect_timeout
        self.tunnel: TunnelDialer | None = None

    def is_local(self, backend: Backend) -> bool:
        """True when ``backend`` is dialled directly (this node, unknown node, or no tunnel)."""
        return (self.tunnel is None or not backend.node_name
                or backend.node_name == self.node_name)

    def dial_tcp(self, backend: Backend, timeout: float | None = None) -> socket.socket:
        """A connected stream socket to ``backend``; raises UnavailableError."""
        timeout = self.connect_timeout if timeout is None else timeout
        if not self.is_local(backend):
            assert self.tunnel is not None
            try:
                return self.tunnel.open_stream(backend.node_name, "tcp", backend.ip,
                                               backend.port, timeout)
            except UnavailableError:
                raise
            except OSError as e:
                raise UnavailableError(f"tunnel to {backend.node_name}: {e}") from e
        sock = socket.socket(_family(backend.ip), socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((backend.ip, backend.port))
        except OSError as e:  # socket.timeout is an OSError too
            sock.close()
            raise UnavailableError(f"connect {backend.ip}:{backend.port}: "
                                   f"{e.strerror or 'timed out'}") from e
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def start_connect(self, backend: Backend) -> _socket.socket:
        """A non-blocking socket whose connect to a local ``backend`` is under way.

        The caller waits for writability and reads ``SO_ERROR``; no greenlet is needed. The
        socket is the C-level ``_socket.socket`` (no gevent wrapper): the data path drives it
        with the hub's watchers itself.
        """
        sock = _socket.socket(_family(backend.ip), _socket.SOCK_STREAM | _socket.SOCK_NONBLOCK)
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        code = sock.connect_ex((backend.ip, backend.port))
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            sock.close()
            raise UnavailableError(f"connect {backend.ip}:{backend.port}: "
                                   f"{errno.errorcode.get(code, code)}")
        return sock

    def open_udp(self, backend: Backend) -> DatagramChannel:
        """A datagram channel to ``backend``; raises UnavailableError."""
        if not self.is_local(backend):
            assert self.tunnel is not None
            try:
                return self.tunnel.open_datagram(backend.node_name, backend.ip, backend.port)
            except UnavailableError:
                raise
            except OSError as e:
                raise UnavailableError(f"tunnel to {backend.node_name}: {e}") from e
        sock = socket.socket(_family(backend.ip), socket.SOCK_DGRAM)
        try:
            sock.connect((backend.ip, backend.port))
        except OSError as e:
            sock.close()
            raise UnavailableError(f"udp {backend.ip}:{backend.port}: {e.strerror}") from e
        return UDPChannel(sock)
