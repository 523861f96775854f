"""One place to start greenlets and subprocesses: named, their failures logged and counted.

Helper programs (``ip``, ``iptables-restore``, ...) run through :func:`run` only: it gives them
the host's environment, not the frozen bundle's (:func:`host_environment`), and turns a missing
program into :class:`MissingHelper`, one message naming it and what needs it.
"""
from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gevent
import gevent.event

from edgemesh.errors import ConfigError
from edgemesh.runtime import metrics

log = logging.getLogger(__name__)

CRASHES = metrics.counter("edgemesh_task_crashes_total",
                          "Greenlets that ended with an unexpected exception.", ["task"])


_missing_logged: set[tuple[str, str]] = set()


def _log_failure(message: str, name: str, *args: Any) -> None:
    """Log the exception being handled: a missing helper once, in one line; else with its
    traceback (a bug)."""
    e = sys.exc_info()[1]
    if isinstance(e, MissingHelper):
        if (name, e.program) not in _missing_logged:
            _missing_logged.add((name, e.program))
            log.error(message + ": %s", name, *args, e)
        return
    log.exception(message, name, *args)


def spawn(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> gevent.Greenlet:
    """Start ``fn`` in a greenlet called ``name``; an exception is logged and counted.

    A :class:`MissingHelper` ends the task with one log line (gevent would print a traceback
    for an exception that leaves the greenlet)."""
    def run() -> Any:
        try:
            return fn(*args, **kwargs)
        except gevent.GreenletExit:
            raise
        except MissingHelper:
            CRASHES.labels(name).inc()
            _log_failure("task %s failed", name)
            return None
        except Exception:
            CRASHES.labels(name).inc()
            _log_failure("task %s failed", name)
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
                _log_failure("task %s failed; restarting in %.1fs", name, backoff)
            gevent.sleep(backoff)
    return spawn(name, loop)


# What each helper program serves and where it comes from, for the missing-helper message.
IPTABLES_USE = ("the proxy's service interception (or run the agent with --no-iptables)",
                "iptables (OpenWrt: iptables-nft, or iptables-zz-legacy)")
HELPER_USES: dict[str, tuple[str, str]] = {
    "ip": ("the agent's edgemesh0 address, its service routes and the list of this node's "
           "addresses (DNS, tunnel, gateway)", "iproute2 (OpenWrt: ip-full)"),
    "conntrack": ("flushing stale UDP flows to services", "conntrack"),
}


class MissingHelper(FileNotFoundError, ConfigError):
    """A helper program is not installed: the host's fault, said in one line.

    Still a ``FileNotFoundError`` (callers that tolerate a missing program keep doing so) and
    a ``ConfigError`` (a node that cannot start without it exits 2 with this message).
    """

    def __init__(self, program: str, need: str = "") -> None:
        use, package = helper_use(program)
        message = (f"helper program {program!r} not found on PATH "
                   f"({os.environ.get('PATH', os.defpath)}): needed for {need or use}; "
                   f"install {package}")
        FileNotFoundError.__init__(self, errno.ENOENT, message, program)
        self.problems = [message]
        self.program = program

    def __str__(self) -> str:
        return self.problems[0]


def helper_use(program: str) -> tuple[str, str]:
    """(what needs ``program``, which package brings it)."""
    name = os.path.basename(program)
    if name.startswith(("iptables", "ip6tables")):
        return IPTABLES_USE
    return HELPER_USES.get(name, ("edgemesh", name))


def host_environment(environ: Mapping[str, str], frozen: bool) -> dict[str, str]:
    """The environment a helper program gets: the host's, as it was before the bundle started.

    PyInstaller's bootloader points ``LD_LIBRARY_PATH`` at the bundle (saving the original in
    ``LD_LIBRARY_PATH_ORIG``), so ``ip`` or ``iptables`` would load the bundle's glibc builds
    of libz, libssl, ... and a router's musl programs fail to load. Its own ``_PYI_*``/
    ``_MEIPASS2`` variables would also confuse a frozen child. Not frozen: unchanged.
    """
    env = dict(environ)
    if not frozen:
        return env
    original = env.pop("LD_LIBRARY_PATH_ORIG", None)
    if original is None:
        env.pop("LD_LIBRARY_PATH", None)
    else:
        env["LD_LIBRARY_PATH"] = original
    for name in [n for n in env if n.startswith("_PYI_") or n == "_MEIPASS2"]:
        del env[name]
    return env


def run(argv: Sequence[str], *, input: bytes | None = None, timeout: float = 30.0,
        check: bool = True, need: str = "") -> subprocess.CompletedProcess[bytes]:
    """Run a helper program (iptables-restore, ip) to completion, cooperatively.

    It gets :func:`host_environment`; a program not installed raises :class:`MissingHelper`
    (``need`` says what wanted it, else :data:`HELPER_USES` does)."""
    log.debug("running %s", " ".join(argv))
    # gevent's subprocess (fork): a posix_spawn path with cooperative pipes was tried and
    # reverted, as its children's exits and EOFs were sometimes never seen (edgemesh cleanup
    # hung); with one transparent listener per protocol the agent no longer holds a
    # descriptor per service for the child to close
    env = host_environment(os.environ, bool(getattr(sys, "frozen", False)))
    try:
        result = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout,
                                env=env)
    except FileNotFoundError as e:
        if e.filename not in (None, argv[0]):
            raise
        raise MissingHelper(argv[0], need) from None
    if check and result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, list(argv), result.stdout,
                                            result.stderr)
    return result


class Reconciler:
    """Calls ``fn()`` after every wake-up, coalescing bursts; never two runs at once.

    Consumers subscribe ``wake`` to the store, and ``fn`` reconciles from current state.
    A failing ``fn`` is retried after ``retry`` seconds; ``period`` adds a periodic resync.
    ``delay``: every run waits that long after its wake-up (a fixed debounce).
    ``min_interval`` instead: a wake-up after a quiet spell runs at once, and runs are at
    least that far apart, so the changes of a burst arriving meanwhile share the next run
    (kube-proxy's ``minSyncPeriod``): one change costs what it costs, a burst a few runs.
    """

    def __init__(self, name: str, fn: Callable[[], None], *, period: float | None = None,
                 retry: float = 1.0, delay: float = 0.0, min_interval: float = 0.0) -> None:
        self.name = name
        self._fn = fn
        self._period = period
        self._retry = retry
        self._delay = delay
        self._min_interval = min_interval
        self._last_run = float("-inf")
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
            elif self._min_interval:
                wait = self._last_run + self._min_interval - time.monotonic()
                if wait > 0:
                    gevent.sleep(wait)  # at most one run per min_interval
            self._event.clear()
            self._last_run = time.monotonic()
            try:
                self._fn()
                self.runs += 1
                self.last_error = ""
            except Exception as e:
                CRASHES.labels(self.name).inc()
                self.last_error = str(e) or type(e).__name__
                _log_failure("reconcile %s failed; retrying in %.1fs", self.name, self._retry)
                gevent.sleep(self._retry)
                self._event.set()
