"""The skeleton every EdgeMesh process runs (agent, gateway, server): build info, SIGTERM and
SIGINT, the admin endpoint, start, wait for a signal, stop in reverse."""
from __future__ import annotations

import logging
import signal
from typing import Protocol

import gevent
import gevent.event

from edgemesh import __version__
from edgemesh.errors import EdgeMeshError
from edgemesh.runtime import metrics
from edgemesh.runtime.admin import Admin

log = logging.getLogger(__name__)

BUILD_INFO = metrics.gauge("edgemesh_build_info", "EdgeMesh version and role.",
                           ["version", "role"])


class StartFailed(EdgeMeshError):
    """A process could not start (its message is logged; the exit code is 1)."""


class Process(Protocol):
    def start(self) -> None: ...  # may raise; ``stop`` is called all the same

    def stop(self) -> None: ...


def serve(role: str, admin: Admin, admin_address: str, process: Process) -> int:
    """Run ``process`` until SIGTERM/SIGINT; returns the exit code."""
    BUILD_INFO.labels(__version__, role).set(1)
    stop = gevent.event.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(sig, stop.set)
    if admin_address:
        host, port = admin.start(admin_address)
        log.info("admin endpoint on http://%s:%d", host, port)
    try:
        try:
            process.start()
        except StartFailed as e:
            log.error("%s", e)
            return 1
        stop.wait()
        log.info("stopping")
    finally:
        process.stop()
        admin.stop()
    return 0
