"""Copying bytes socket to socket inside the kernel: ``splice`` through a pipe.

The relay moves ciphertext it never looks at, so it needs no copy into Python: each chunk goes
socket → pipe → socket (``os.splice``), which costs a fraction of the CPU of ``recv`` +
``sendall`` (docs/performance.md). The pipe is enlarged to ``PIPE_SIZE`` so one splice moves
what the socket holds. Where splice is refused (not a socket the kernel can splice), the copy
falls back to ``recv``/``sendall``.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Callable

import gevent
from gevent.socket import wait_read, wait_write

PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
FALLBACK_CHUNK = 256 * 1024

# given a byte count about to be sent, how long to wait first (a rate limit); 0: send now
Pace = Callable[[int], float]


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # above fs.pipe-max-size: the default size still works
    return r, w


def copy_stream(src: socket.socket, dst: socket.socket, first: bytes, pace: Pace) -> int:
    """Copy ``first`` then everything ``src`` sends to ``dst`` until EOF (then SHUT_WR on
    ``dst``); returns the bytes copied. OSError when either side breaks."""
    total = 0
    if first:
        _pause(pace(len(first)))
        dst.sendall(first)
        total += len(first)
    r, w = _pipe()
    try:
        while True:
            try:
                n = os.splice(src.fileno(), w, PIPE_SIZE, flags=FLAGS)
            except BlockingIOError:
                wait_read(src.fileno())
                continue
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                return total + _copy_plain(src, dst, pace)
            if not n:
                dst.shutdown(socket.SHUT_WR)
                return total
            _pause(pace(n))
            _drain(r, dst, n)
            total += n
    finally:
        os.close(r)
        os.close(w)


def _drain(r: int, dst: socket.socket, n: int) -> None:
    while n:
        try:
            n -= os.splice(r, dst.fileno(), n, flags=FLAGS)
        except BlockingIOError:
            wait_write(dst.fileno())


def _copy_plain(src: socket.socket, dst: socket.socket, pace: Pace) -> int:
    total = 0
    while data := src.recv(FALLBACK_CHUNK):
        _pause(pace(len(data)))
        dst.sendall(data)
        total += len(data)
    dst.shutdown(socket.SHUT_WR)
    return total


def _pause(seconds: float) -> None:
    if seconds > 0:
        gevent.sleep(seconds)
