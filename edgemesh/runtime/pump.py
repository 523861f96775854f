"""The one greenlet byte pump: socket to socket inside the kernel, ``splice`` through a pipe.

The relay's circuits, the gateway's TCP routes and TLS passthrough, and upgraded (WebSocket)
HTTP connections move bytes they never look at, so they need no copy into Python: each chunk
goes socket → pipe → socket (``os.splice``), which costs a fraction of the CPU of ``recv`` +
``sendall`` (docs/performance.md). The pipe is enlarged to ``PIPE_SIZE`` so one splice moves
what the socket holds. Where splice cannot work — a TLS socket (its bytes must go through the
TLS layer), or a socket the kernel refuses (EINVAL) — the copy uses ``recv``/``sendall``.
(The proxy's TCP data path is written on libev callbacks instead: ``proxy/tcp.py``.)
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import sys
from collections.abc import Callable

import gevent
from gevent.socket import wait_read, wait_write

from edgemesh.runtime import tasks

PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
FALLBACK_CHUNK = 256 * 1024
# SO_LINGER on, 0 s: close() sends RST and leaves no TIME_WAIT
LINGER_RST = struct.pack("ii", 1, 0)

# given a byte count about to be sent, how long to wait first (a rate limit); 0: send now
Pace = Callable[[int], float]


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # above fs.pipe-max-size: the default size still works
    return r, w


def _now(n: int) -> float:
    return 0.0


def _is_tls(sock: socket.socket) -> bool:
    ssl = sys.modules.get("ssl")  # never imported here: a TLS socket means it was
    return ssl is not None and isinstance(sock, ssl.SSLSocket)


def copy_stream(src: socket.socket, dst: socket.socket, first: bytes = b"",
                pace: Pace = _now, idle_timeout: float | None = None,
                progress: Callable[[int], None] | None = None) -> int:
    """Copy ``first`` then everything ``src`` sends to ``dst`` until EOF (then SHUT_WR on
    ``dst``); returns the bytes copied, and tells ``progress`` each chunk as it goes. OSError
    when either side breaks, ``socket.timeout`` when ``src`` sends nothing for
    ``idle_timeout`` seconds."""
    total = 0
    if first:
        _pause(pace(len(first)))
        dst.sendall(first)
        total += len(first)
        if progress is not None:
            progress(len(first))
    if _is_tls(src) or _is_tls(dst):
        return total + _copy_plain(src, dst, pace, idle_timeout, progress)
    r, w = _pipe()
    try:
        while True:
            try:
                n = os.splice(src.fileno(), w, PIPE_SIZE, flags=FLAGS)
            except BlockingIOError:
                wait_read(src.fileno(), idle_timeout)
                continue
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                return total + _copy_plain(src, dst, pace, idle_timeout, progress)
            if not n:
                dst.shutdown(socket.SHUT_WR)
                return total
            _pause(pace(n))
            _drain(r, dst, n)
            total += n
            if progress is not None:
                progress(n)
    finally:
        os.close(r)
        os.close(w)


def _drain(r: int, dst: socket.socket, n: int) -> None:
    while n:
        try:
            n -= os.splice(r, dst.fileno(), n, flags=FLAGS)
        except BlockingIOError:
            wait_write(dst.fileno())


def _copy_plain(src: socket.socket, dst: socket.socket, pace: Pace,
                idle_timeout: float | None, progress: Callable[[int], None] | None) -> int:
    total = 0
    src.settimeout(idle_timeout)
    while data := src.recv(FALLBACK_CHUNK):
        _pause(pace(len(data)))
        dst.sendall(data)
        total += len(data)
        if progress is not None:
            progress(len(data))
    dst.shutdown(socket.SHUT_WR)
    return total


def _pause(seconds: float) -> None:
    if seconds > 0:
        gevent.sleep(seconds)


def both_ways(a: socket.socket, b: socket.socket, to_b: bytes = b"", to_a: bytes = b"",
              idle_timeout: float | None = None,
              on_a_to_b: Callable[[int], None] | None = None,
              on_b_to_a: Callable[[int], None] | None = None) -> None:
    """Pump ``a`` ⇄ ``b`` (after sending the pending bytes) until both directions end, each
    half-close passed on; a direction idle for ``idle_timeout`` ends as if at EOF. A direction
    that breaks (reset) shuts both sockets down, which ends the other. Closes nothing: callers
    close both in their ``finally``. ``on_a_to_b``/``on_b_to_a`` get each chunk's size."""
    back = tasks.spawn("pump", _one_way, b, a, to_a, idle_timeout, on_b_to_a)
    try:
        _one_way(a, b, to_b, idle_timeout, on_a_to_b)
        back.join()
    finally:
        back.kill(block=False)


def _one_way(src: socket.socket, dst: socket.socket, first: bytes, idle_timeout: float | None,
             progress: Callable[[int], None] | None) -> None:
    try:
        copy_stream(src, dst, first, idle_timeout=idle_timeout, progress=progress)
    except TimeoutError:  # idle: pass the end on, as at EOF
        _shutdown(dst, socket.SHUT_WR)
    except (OSError, ValueError):  # reset, or the other side closed our socket
        _shutdown(src, socket.SHUT_RDWR)
        _shutdown(dst, socket.SHUT_RDWR)


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except (OSError, ValueError):
        pass
