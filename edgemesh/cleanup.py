"""``edgemesh cleanup``: remove every iptables rule and device the agent made.

Each module that changes the host registers a cleanup function in ``CLEANERS``; they run in
order and are idempotent, so cleanup after ``kill -9`` or twice in a row is safe.
"""
from __future__ import annotations

import importlib
import logging

from edgemesh.config import Config

log = logging.getLogger(__name__)

# "module.path:function" taking the Config; each must succeed when there is nothing to remove.
CLEANERS: list[str] = [
    "edgemesh.proxy.iptables:cleanup",
    "edgemesh.netdev:remove",  # the edgemesh0 bridge (after the rules that use its address)
]


def run(config: Config) -> int:
    failed = 0
    for target in CLEANERS:
        path, _, fn = target.partition(":")
        try:
            getattr(importlib.import_module(path), fn)(config)
        except Exception as e:
            log.error("cleanup %s failed: %s", target, e)
            failed += 1
    return 1 if failed else 0
