"""Directory change notification through Linux inotify, by ctypes on libc (no dependency).

``Watcher.open()`` returns None where the kernel or libc has no inotify (the caller polls
instead). ``watch(path)`` adds a directory; ``wait(timeout)`` blocks the calling greenlet on the
descriptor (gevent's hub watches it) and returns True when something in a watched directory
changed, after draining every pending event. The events themselves are not decoded: the files
source rescans (a stat per file) and re-reads only what changed, so the event is a wake-up, and
an overflowed queue (``IN_Q_OVERFLOW``) costs nothing more than any other event.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os

log = logging.getLogger(__name__)

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x002, 0x004, 0x008
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x040, 0x080, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_ONLYDIR = 0x01000000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
        | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)


class Watcher:
    """One inotify descriptor and the directories it watches (by path)."""

    def __init__(self, libc: ctypes.CDLL, fd: int) -> None:
        self._libc = libc
        self.fd = fd
        self.watched: dict[str, int] = {}  # path -> watch descriptor

    @classmethod
    def open(cls) -> Watcher | None:
        """A watcher, or None where inotify is unavailable (then poll)."""
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            init = libc.inotify_init1
        except (OSError, AttributeError):
            return None
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        fd = init(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.info("inotify unavailable (%s); polling manifests",
                     os.strerror(ctypes.get_errno()))
            return None
        return cls(libc, fd)

    def watch(self, path: str) -> bool:
        """Watch directory ``path`` (again: its watch descriptor is reused); False if refused."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if err != errno.ENOENT:
                log.debug("inotify_add_watch %s: %s", path, os.strerror(err))
            return False
        self.watched[path] = wd
        return True

    def forget(self, keep: set[str]) -> None:
        """Stop tracking directories not in ``keep`` (the kernel drops watches of removed
        directories itself; this only keeps our table small)."""
        for path in [p for p in self.watched if p not in keep]:
            del self.watched[path]

    def wait(self, timeout: float | None) -> bool:
        """Block until an event arrives or ``timeout`` passes; True if events were drained."""
        from gevent.socket import wait_read

        try:
            wait_read(self.fd, timeout=timeout)
        except TimeoutError:  # gevent raises socket.timeout, a TimeoutError
            return False
        return self.drain()

    def drain(self) -> bool:
        """Read every pending event; True if there was any."""
        got = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return got
            if not data:
                return got
            got = True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
