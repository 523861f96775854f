"""Run a helper program without copying the agent into it: ``posix_spawn`` and cooperative pipes.

An agent serving 10,000 Services holds thousands of descriptors and a large heap. gevent's
``subprocess`` forks in Python and, in the child, lists ``/proc/self/fd`` and closes every
descriptor one by one before ``exec``: tens of milliseconds per helper at that size. glibc's
``posix_spawn`` (``clone(CLONE_VM|CLONE_VFORK)``) copies no page tables, and the child inherits
nothing but its three pipes: Python opens every descriptor close-on-exec (PEP 446), so there is
nothing to close. The pipes are read and written cooperatively; ``waitpid`` is gevent's (it
watches children it is told of: its ``posix_spawnp`` wrapper does that).

``run_spawned`` returns what ``subprocess.run(..., capture_output=True)`` would.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

import gevent
from gevent import os as gos

CHUNK = 65536


def run_spawned(argv: Sequence[str], *, input: bytes | None = None, timeout: float = 30.0,
                env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion; raises ``subprocess.TimeoutExpired`` (child killed) and
    ``FileNotFoundError`` like ``subprocess.run``."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid = os.posix_spawnp(argv[0], list(argv), dict(os.environ if env is None else env),
                              file_actions=[(os.POSIX_SPAWN_DUP2, in_r, 0),
                                            (os.POSIX_SPAWN_DUP2, out_w, 1),
                                            (os.POSIX_SPAWN_DUP2, err_w, 2)])
    except BaseException:
        for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
            os.close(fd)
        raise
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    for fd in (in_w, out_r, err_r):
        os.set_blocking(fd, False)
    # each of our pipe ends is closed exactly once: a second close could hit a descriptor
    # number another greenlet was given meanwhile (and gevent's close raises for it)
    mine = {in_w, out_r, err_r}
    feeder = gevent.spawn(_feed, in_w, input or b"", mine)
    readers = [gevent.spawn(_drain, fd) for fd in (out_r, err_r)]
    try:
        with gevent.Timeout(timeout, subprocess.TimeoutExpired(list(argv), timeout)):
            gevent.joinall([feeder, *readers], raise_error=True)
            _, status = os.waitpid(pid, 0)
    except BaseException:
        _kill(pid)
        gevent.killall([feeder, *readers])
        raise
    finally:
        for fd in list(mine):
            _close_once(fd, mine)
    return subprocess.CompletedProcess(list(argv), os.waitstatus_to_exitcode(status),
                                       readers[0].value, readers[1].value)


def _feed(fd: int, data: bytes, mine: set[int]) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[gos.nb_write(fd, view):]
    except BrokenPipeError:
        pass  # the helper did not read all of its input; its exit status says why
    finally:
        _close_once(fd, mine)  # EOF for the helper's stdin


def _close_once(fd: int, mine: set[int]) -> None:
    if fd in mine:
        mine.discard(fd)
        _close(fd)


def _drain(fd: int) -> bytes:
    parts = []
    while chunk := gos.nb_read(fd, CHUNK):
        parts.append(chunk)
    return b"".join(parts)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as e:
        if e.errno != errno.EBADF:
            raise


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
