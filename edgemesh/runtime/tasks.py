"""One place to start greenlets and subprocesses: named, their failures logged and counted."""
from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import gevent
import gevent.event

from edgemesh.runtime import metrics

log = logging.getLogger(__name__)

CRASHES = metrics.counter("edgemesh_task_crashes_total",
                          "Greenlets that ended with an unexpected exception.", ["task"])


def spawn(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> gevent.Greenlet:
    """Start ``fn`` in a greenlet called ``name``; an exception is logged and counted."""
    def run() -> Any:
        try:
            return fn(*args, **kwargs)
        except gevent.GreenletExit:
            raise
        except Exception:
            CRASHES.labels(name).inc()
            log.exception("task %s failed", name)
            raise
    g = gevent.Greenlet(run)
    g.name = name
    g.start()
    return g


def spawn_forever(name: str, fn: Callable[[], Any], backoff: float = 1.0) -> gevent.Greenlet:
    """Run ``fn`` again after ``backoff`` seconds whenever it returns or fails."""
    def loop() -> None:
        while True:
            try:
                fn()
            except gevent.GreenletExit:
                raise
            except Exception:
                CRASHES.labels(name).inc()
                log.exception("task %s failed; restarting in %.1fs", name, backoff)
            gevent.sleep(backoff)
    return spawn(name, loop)


def run(argv: Sequence[str], *, input: bytes | None = None, timeout: float = 30.0,
        check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a helper program (iptables-restore, ip) to completion, cooperatively."""
    log.debug("running %s", " ".join(argv))
    from edgemesh.runtime.spawn import run_spawned  # posix_spawn: no fork of a large agent

    result = run_spawned(argv, input=input, timeout=timeout)
    if check and result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, list(argv), result.stdout,
                                            result.stderr)
    return result


class Reconciler:
    """Calls ``fn()`` after every wake-up, coalescing bursts; never two runs at once.

    Consumers subscribe ``wake`` to the store, and ``fn`` reconciles from current state.
    A failing ``fn`` is retried after ``retry`` seconds; ``period`` adds a periodic resync.
    """

    def __init__(self, name: str, fn: Callable[[], None], *, period: float | None = None,
                 retry: float = 1.0, delay: float = 0.0) -> None:
        self.name = name
        self._fn = fn
        self._period = period
        self._retry = retry
        self._delay = delay
        self._event = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None
        self.runs = 0
        self.last_error = ""

    def wake(self, *_: Any) -> None:
        self._event.set()

    def start(self) -> None:
        self._event.set()
        self._greenlet = spawn(self.name, self._loop)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()

    def _loop(self) -> None:
        while True:
            self._event.wait(timeout=self._period)
            if self._delay:
                gevent.sleep(self._delay)  # let a burst of changes land before acting
            self._event.clear()
            try:
                self._fn()
                self.runs += 1
                self.last_error = ""
            except Exception as e:
                CRASHES.labels(self.name).inc()
                self.last_error = str(e) or type(e).__name__
                log.exception("reconcile %s failed; retrying in %.1fs", self.name, self._retry)
                gevent.sleep(self._retry)
                self._event.set()
