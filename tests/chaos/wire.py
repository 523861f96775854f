"""A link with delay and loss, in user space: this kernel has no ``netem`` qdisc.

Two tap devices, one in each namespace, joined by this process; frames read from one tap are
written to the other after ``delay`` seconds, and dropped with probability ``loss``. The
impairment is read from a JSON control file (``{"delay": 0.3, "loss": 0.05}``) whenever it
changes, so the test switches it on and off while traffic runs.

    python -m tests.chaos.wire NS_A TAP_A NS_B TAP_B CONTROL
"""
from __future__ import annotations

import collections
import ctypes
import fcntl
import json
import os
import random
import struct
import sys
import threading
import time

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
CLONE_NEWNET = 0x40000000


def open_tap(netns: str, name: str) -> int:
    """The fd of tap ``name`` in namespace ``netns`` (the device is bound at open time)."""
    libc = ctypes.CDLL(None, use_errno=True)
    ns_fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(ns_fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
    finally:
        os.close(ns_fd)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


class Impairment:
    def __init__(self, path: str) -> None:
        self.path, self.mtime, self.delay, self.loss = path, 0.0, 0.0, 0.0

    def refresh(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime
            if mtime != self.mtime:
                with open(self.path) as f:
                    conf = json.load(f)
                self.delay, self.loss = float(conf.get("delay", 0)), float(conf.get("loss", 0))
                self.mtime = mtime
        except (OSError, ValueError):
            pass


def pump(src: int, dst: int, imp: Impairment) -> None:
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    ready = threading.Condition()

    def writer() -> None:
        while True:
            with ready:
                while not queue:
                    ready.wait()
                due, frame = queue[0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with ready:
                queue.popleft()
            try:
                os.write(dst, frame)
            except OSError:
                pass

    threading.Thread(target=writer, daemon=True).start()
    while True:
        frame = os.read(src, 65536)
        if imp.loss and random.random() < imp.loss:
            continue
        with ready:
            queue.append((time.monotonic() + imp.delay, frame))
            ready.notify()


def main(argv: list[str]) -> None:
    ns_a, tap_a, ns_b, tap_b, control = argv
    fd_a, fd_b = open_tap(ns_a, tap_a), open_tap(ns_b, tap_b)
    imp = Impairment(control)
    imp.refresh()
    threading.Thread(target=pump, args=(fd_a, fd_b, imp), daemon=True).start()
    threading.Thread(target=pump, args=(fd_b, fd_a, imp), daemon=True).start()
    print("wire up", flush=True)
    while True:
        time.sleep(0.2)
        imp.refresh()


if __name__ == "__main__":
    main(sys.argv[1:])
