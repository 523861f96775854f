"""Moving bytes between tunnel streams and sockets, on both ends of a stream.

- Opening side: ``stream_socket`` hands the caller a real socket (one end of a socketpair) and
  pumps the other end to the stream, so the proxy treats a remote endpoint like a local one.
  ``AttachedStream`` pumps the caller's own client socket instead (the proxy's TCP path,
  ``TunnelModule.attach_stream``): no socketpair, so one copy and a few syscalls less per chunk
  on the sending node — reads land straight in record payloads, the session's reader sends
  decrypted data straight to the client.
  ``TunnelDatagrams`` is the UDP channel: one DATA frame per datagram.
- Receiving side: ``serve_tcp`` / ``serve_udp`` connect to the local endpoint and pump.
Half-closes cross the tunnel as FIN; a reset or error closes the socket.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import gevent

from edgemesh.errors import UnavailableError
from edgemesh.runtime.pump import LINGER_RST
from edgemesh.runtime.tasks import spawn
from edgemesh.tunnel.frames import MAX_PAYLOAD, ResetCode
from edgemesh.tunnel.stream import Stream, StreamClosed

log = logging.getLogger(__name__)

UDP_MAX = 65535
PAIR_BUFFER = 1024 * 1024


def _socket_to_stream(sock: socket.socket, stream: Stream) -> None:
    try:
        stream.send_from(sock)
    except (OSError, UnavailableError):
        stream.reset(ResetCode.CANCEL)


def _stream_to_socket(stream: Stream, sock: socket.socket) -> None:
    try:
        stream.drain_to(sock)
    except (OSError, UnavailableError):
        stream.reset(ResetCode.CANCEL)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def pump(sock: socket.socket, stream: Stream) -> None:
    """Copy both ways until both directions ended; close the socket after."""
    up = spawn("tunnel-pump-up", _socket_to_stream, sock, stream)
    try:
        _stream_to_socket(stream, sock)
        up.join()
    finally:
        up.kill(block=False)
        sock.close()
        stream.session.forget_if_done(stream.id)


def stream_socket(stream: Stream) -> socket.socket:
    """A socket whose peer end is pumped to ``stream`` (the caller owns the returned end)."""
    outer, inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for end in (outer, inner):  # room for a few records per read (fewer wake-ups per MiB)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PAIR_BUFFER)
    spawn("tunnel-pump", pump, inner, stream)
    return outer


class AttachedStream:
    """A client socket pumped to and from ``stream`` by the tunnel itself, until both sides
    sent FIN (half-closes cross as FIN and SHUT_WR) or either side reset.

    The tunnel works on its own duplicate of the client's descriptor, so the caller may close
    its socket whenever it likes; the connection ends when both are closed. A reset (by the
    peer, the client, or the session dying) resets the client too (RST, like the proxy's
    abort); ``close`` resets the stream and stops the pumps. ``on_end`` is called once, from
    the pump, when it is over (not after ``close``).
    """

    def __init__(self, stream: Stream, client: socket.socket,
                 on_end: Callable[[], None] | None = None) -> None:
        self.stream = stream
        self.sock = socket.socket(fileno=os.dup(client.fileno()))
        self.on_end = on_end
        self.ending = False  # the pump is finishing: close() has nothing left to do
        self.running = False
        self.pump = spawn("tunnel-attached", self._run)

    def _up(self) -> None:
        try:
            self.stream.send_from(self.sock)  # until the client's FIN, then ours
        except (OSError, UnavailableError):
            self.stream.reset(ResetCode.CANCEL)  # drain_to then raises: the pump ends

    def _run(self) -> None:
        self.running = True
        stream, sock = self.stream, self.sock
        up = spawn("tunnel-attached-up", self._up)
        try:
            stream.drain_to(sock)  # until the peer's FIN (then SHUT_WR towards the client)
            up.join()
        except (OSError, UnavailableError):
            stream.reset(ResetCode.CANCEL)
        finally:
            self.ending = True
            try:
                up.kill()
            except gevent.GreenletExit:  # close()'s kill, sent before we got here: done
                up.kill(block=False)
            if stream.error is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                except OSError:
                    pass
            sock.close()
            stream.session.forget_if_done(stream.id)
            if self.on_end is not None:
                self.on_end()

    def close(self) -> None:
        """Abort: reset the stream and stop pumping (never blocks)."""
        if self.ending:
            return
        self.ending = True
        self.on_end = None
        self.stream.reset(ResetCode.CANCEL)
        self.pump.kill(block=False)  # its finally closes the socket, with RST
        if not self.running:  # killed before it ran: no finally will run
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            self.sock.close()

    def setsockopt(self, level: int, option: int, value: bytes | int) -> None:
        """On the client socket (the proxy's abort sets SO_LINGER on both of its sockets)."""
        if not self.ending:
            self.sock.setsockopt(level, option, value)


def serve_tcp(stream: Stream, timeout: float) -> None:
    """Receiving side of a TCP stream: connect to the local endpoint, accept, pump."""
    t = stream.target
    family = socket.AF_INET6 if ":" in t.ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((t.ip, t.port))
    except OSError as e:
        sock.close()
        stream.reset(ResetCode.CONNECT_FAILED, f"connect {t.ip}:{t.port}: "
                                               f"{e.strerror or 'timed out'}")
        return
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        stream.accept()
    except StreamClosed:  # the opener stopped waiting while we connected: nothing to carry
        sock.close()
        return
    pump(sock, stream)


def serve_udp(stream: Stream, idle_timeout: float) -> None:
    """Receiving side of a UDP stream: one connected UDP socket, datagrams both ways."""
    t = stream.target
    family = socket.AF_INET6 if ":" in t.ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.connect((t.ip, t.port))
    except OSError as e:
        sock.close()
        stream.reset(ResetCode.CONNECT_FAILED, f"udp {t.ip}:{t.port}: {e.strerror}")
        return
    stream.accept()

    def replies() -> None:
        while True:
            try:
                data = sock.recv(UDP_MAX)
            except ConnectionRefusedError:
                continue  # ICMP port unreachable from an earlier datagram
            except OSError:
                return
            try:
                stream.send_datagram(data)
            except UnavailableError:
                return

    back = spawn("tunnel-udp-replies", replies)
    try:
        while True:
            data = stream.recv(timeout=idle_timeout)
            if not data:
                break
            try:
                sock.send(data)
            except OSError:
                pass  # UDP: a lost datagram is not an error
    except (TimeoutError, UnavailableError):
        pass
    finally:
        back.kill(block=False)
        sock.close()
        stream.reset(ResetCode.CANCEL)


class TunnelDatagrams:
    """The proxy's UDP channel to a remote endpoint: one stream, one DATA frame per datagram."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def send(self, data: bytes) -> None:
        if len(data) > MAX_PAYLOAD:
            return  # cannot cross in one frame; dropped like an oversized datagram
        try:
            for _ in range(100):
                if self.stream.send_datagram(data):
                    return
                gevent.sleep(0.01)  # window full: brief wait, then drop (UDP semantics)
        except StreamClosed as e:
            raise UnavailableError(str(e)) from e

    def recv(self) -> bytes:
        data = self.stream.recv()
        if not data:
            raise UnavailableError("tunnel datagram stream ended")
        return data

    def close(self) -> None:
        self.stream.reset(ResetCode.CANCEL)
