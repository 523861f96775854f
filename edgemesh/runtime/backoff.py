"""When an accept loop pauses: the errors that mean "out of resources" and how long to wait.

gevent's ``StreamServer`` stops its accept watcher on such an error and starts it again after
a delay that doubles from 0.01 s up to 1 s and is reset by the next success. A level-triggered
watcher that simply returns instead is woken again at once while the listen queue is not
empty: a CPU spin for as long as descriptors stay exhausted. No I/O here: the accept loops
(``proxy/tcp.Acceptor``, ``tunnel/node.Node``) do the stopping and the waiting.
"""
from __future__ import annotations

import errno

RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
FIRST_DELAY = 0.01
MAX_DELAY = 1.0


def is_resource_error(err: OSError) -> bool:
    """Whether ``accept`` failed for lack of descriptors or memory (pausing may help)."""
    return err.errno in RESOURCE_ERRNOS


class AcceptBackoff:
    """The delay before the next accept after a resource error: doubles, capped, reset."""

    def __init__(self, first: float = FIRST_DELAY, cap: float = MAX_DELAY) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def delay(self) -> float:
        """How long to pause now; the following pause, if still failing, is twice as long."""
        delay = self._next
        self._next = min(self.cap, delay * 2)
        return delay

    def reset(self) -> None:
        """An accept succeeded: the next failure pauses for the shortest delay again."""
        self._next = self.first
