"""Helpers run through posix_spawn with cooperative pipes behave like ``subprocess.run``."""
from __future__ import annotations

import os
import socket
import subprocess

import gevent
import pytest

from edgemesh.runtime import spawn, tasks
from edgemesh.runtime.spawn import run_spawned


def test_output_input_and_exit_status():
    r = run_spawned(["sh", "-c", "wc -c; echo oops >&2; exit 3"], input=b"x" * 300_000)
    assert (r.stdout.strip(), r.stderr, r.returncode) == (b"300000", b"oops\n", 3)
    with pytest.raises(subprocess.CalledProcessError):
        tasks.run(["false"])


def test_timeout_kills_and_missing_binary_raises():
    with pytest.raises(subprocess.TimeoutExpired):
        run_spawned(["sleep", "10"], timeout=0.2)
    with pytest.raises(FileNotFoundError):
        run_spawned(["no-such-helper-edgemesh"])


def test_child_inherits_no_descriptor_and_parent_keeps_none():
    socks = [socket.socket() for _ in range(200)]
    try:
        before = [int(fd) for fd in os.listdir("/proc/self/fd")]
        inheritable = {fd for fd in before if fd > 2 and _inheritable(fd)}  # the harness's
        r = run_spawned(["ls", "/proc/self/fd"])
        child = {int(fd) for fd in r.stdout.split()} - {0, 1, 2} - inheritable
        assert len(child) <= 1  # ls's own listing of /proc/self/fd
        assert not child & {s.fileno() for s in socks}
        gevent.sleep(0)  # gevent closes descriptors at the next loop turn
        assert len(os.listdir("/proc/self/fd")) <= len(before)
    finally:
        for s in socks:
            s.close()


def test_other_greenlets_run_while_a_helper_runs():
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(10)])
    run_spawned(["sleep", "0.3"])
    assert len(ticks) >= 5
    ticker.kill()


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:
        return False  # the listing's own descriptor, closed since


@pytest.mark.parametrize(("argv", "data"), [(["true"], b""), (["cat"], os.urandom(1 << 20))])
def test_every_pipe_end_is_closed_once(monkeypatch, argv: list[str], data: bytes) -> None:
    """The feeder closes stdin for EOF; closing it again could close a descriptor number
    another greenlet was given meanwhile (an agent lost its netlink socket that way)."""
    closed: list[int] = []
    real = spawn._close
    monkeypatch.setattr(spawn, "_close", lambda fd: (closed.append(fd), real(fd)))
    result = run_spawned(argv, input=data, timeout=10)
    assert result.returncode == 0 and result.stdout == data
    assert len(closed) == len(set(closed)) == 3
