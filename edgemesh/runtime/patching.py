"""gevent's monkey-patching for the CLI entry: what ``patch_all()`` patches, at less idle memory.

Same patched result as ``gevent.monkey.patch_all()``, with two differences in *when* and *how*:

- ``ssl`` is patched when something first imports it, inside that import (before the importer
  sees the module), instead of being imported in order to be patched. Only the gateway's TLS
  and the kube source's https need ``ssl``; an agent that never imports it saves the module,
  ``_ssl`` and the mapped libssl/libcrypto (measured ~3-5 MB RSS).
- gevent asks ``importlib.metadata`` for plugin entry points on every patched module, which
  imports zipfile, csv and email (~1.4 MB RSS). The one plugin installed (gevent's own warning
  for patching signal without os) cannot fire here: os is patched. Subscribers registered
  through ``zope.event`` are still notified.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

# stdlib modules gevent patches on their first import, and how
LAZY: dict[str, Callable[[], None]] = {}


def patch_all() -> None:
    """Patch like ``gevent.monkey.patch_all()``; ``ssl`` is patched on its first import."""
    from gevent import monkey

    with _without_entry_points():
        if "ssl" in sys.modules:  # imported already: patch now, as patch_all would
            monkey.patch_all()
            return
        monkey.patch_all(ssl=False)
    LAZY["ssl"] = _patch_ssl
    sys.meta_path.insert(0, _PatchOnImport())


def _patch_ssl() -> None:
    from gevent import monkey

    with _without_entry_points():
        # _first_time=False: nobody holds ssl's names yet, so gevent's search of the whole heap
        # for unpatched references (its "imported before patching" warning) finds nothing.
        monkey.patch_ssl(_first_time=False)


@contextlib.contextmanager
def _without_entry_points() -> Iterator[None]:
    from gevent import events

    lookup = events.notify_and_call_entry_points
    events.notify_and_call_entry_points = events.notify
    try:
        yield
    finally:
        events.notify_and_call_entry_points = lookup


class _PatchOnImport:
    """A meta path finder that hands out the real spec with a loader that patches after exec."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        patch = LAZY.pop(fullname, None)  # popped first: finding the real spec re-enters here
        if patch is None:
            return None
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _PatchingLoader(spec.loader, patch)  # type: ignore[assignment]
        return spec


class _PatchingLoader:
    """Wraps a module's own loader: executes the module, then patches it."""

    def __init__(self, loader: Any, patch: Callable[[], None]) -> None:
        self.loader = loader
        self.patch = patch

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        self.patch()

    def __getattr__(self, name: str) -> Any:  # get_source, is_package ... of the real loader
        return getattr(self.loader, name)
