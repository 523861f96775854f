"""The garbage collector around the first load of a large cluster.

Loading 10,000 Services allocates about a million objects that live as long as the agent; the
cyclic garbage collector would walk the growing heap again and again while they are made (a
third of the load time at that size) and, afterwards, in every full collection (idle CPU).
Our metadata holds no reference cycles (frozen dataclasses of strings and tuples, freed by
reference counting), so ``hold_until_synced`` turns the collector off until the store's first
sync (at most ``limit`` seconds), then moves everything alive into the permanent generation
(``gc.freeze``): later collections only look at what was allocated since.
"""
from __future__ import annotations

import ctypes
import gc
import logging
from collections.abc import Callable
from typing import Any

import gevent

log = logging.getLogger(__name__)

LIMIT = 60.0


class FirstLoad:
    """Collector off from ``hold()`` until the store syncs (or ``limit`` passes)."""

    def __init__(self, store: Any, limit: float = LIMIT,
                 on_release: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.on_release = on_release  # e.g. drop the parsers' sharing tables
        self.limit = limit
        self.held = False
        self._timer: gevent.Greenlet | None = None

    def hold(self) -> None:
        if not gc.isenabled():
            return  # someone else manages the collector (a test, a profiler)
        gc.disable()
        self.held = True
        self.store.subscribe(self._changed, ())
        self._timer = gevent.spawn_later(self.limit, self.release)

    def _changed(self, _: frozenset[str]) -> None:
        if self.store.synced:
            self.release()

    def release(self) -> None:
        """Collector back on, with what is alive now frozen out of its way."""
        if not self.held:
            return
        self.held = False
        self.store.unsubscribe(self._changed)
        if self._timer is not None and self._timer is not gevent.getcurrent():
            self._timer.kill(block=False)
        self.on_release()
        # No collection first: with the collector off since start, everything allocated is
        # young, so even collect(1) walked the whole heap (0.3-0.5 s at 10k Services, on the
        # way to ready) to free ~1 MB of startup cycles.
        gc.freeze()
        gc.enable()
        _trim()
        if log.isEnabledFor(logging.DEBUG):  # counting walks the frozen list (~10 ms at 10k)
            log.debug("garbage collector on; %d objects frozen", gc.get_freeze_count())


def _trim() -> None:
    """Give the allocator's free pages back to the system (glibc), after the load's peak."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (musl on OpenWrt): nothing to trim
