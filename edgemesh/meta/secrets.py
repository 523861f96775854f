"""Secrets for the gateway's TLS, watched per namespace: only where Gateways need them (K1).

Secrets are never listed cluster-wide: one list+watch per namespace that
``rule(gateways)`` names (by default ``credential_namespaces``: the namespaces of Gateways with
a ``tls.credentialName``), reconciled whenever Gateways change. A namespace that appears gets
its own loop; one that goes away has its loop stopped and its Secrets dropped from the store.
The gateway's RBAC grants Secrets per namespace (build/gateway/), so a 403 there means "not
granted in that namespace" (feature off, retried by the loop), never a cluster-wide request.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import gevent
import requests

from edgemesh.meta.store import Store
from edgemesh.meta.watch import KindMachine
from edgemesh.runtime import tasks

log = logging.getLogger(__name__)

SECRET = "Secret"

SecretNamespaces = Callable[[Iterable[Any]], set[str]]  # Gateways -> namespaces to watch


def credential_namespaces(gateways: Iterable[Any]) -> set[str]:
    """Namespaces of Gateways with a server naming a TLS Secret (``tls.credentialName``)."""
    return {g.meta.namespace for g in gateways
            if any(s.tls is not None and s.tls.credential_name for s in g.servers)}


def replace_in_namespace(store: Store, kind: str, ns: str,
                         pairs: Sequence[tuple[Any, Any]]) -> None:
    """Make ``kind`` in namespace ``ns`` hold exactly ``pairs``; other namespaces kept."""
    keep = [(o, store.raw(kind, o.meta.namespace, o.meta.name))
            for o in store.list(kind) if o.meta.namespace != ns]
    store.replace(kind, [*keep, *pairs])


class SecretWatches:
    """One Secret loop per namespace the Gateways need; ``states`` by namespace.

    ``machine(ns)`` makes a namespace's ``KindMachine`` and ``run(machine)`` is its loop (the
    kube source's); each namespace gets its own HTTP session (``session(ns)``)."""

    def __init__(self, store: Store, rule: SecretNamespaces, new_session: Callable[[],
                 requests.Session], machine: Callable[[str], KindMachine],
                 run: Callable[[KindMachine], None]) -> None:
        self.store = store
        self.rule = rule
        self.states: dict[str, KindMachine] = {}
        self._new_session = new_session
        self._machine = machine
        self._run = run
        self._loops: dict[str, gevent.Greenlet] = {}
        self._sessions: dict[str, requests.Session] = {}
        self._reconciler = tasks.Reconciler("kube-secret-namespaces", self.reconcile,
                                            delay=0.05)

    def start(self) -> None:
        self.store.subscribe(self._reconciler.wake, ("Gateway", SECRET))
        self._reconciler.start()

    def stop_reconciling(self) -> None:
        self.store.unsubscribe(self._reconciler.wake)
        self._reconciler.stop()

    def stop_loops(self) -> None:
        for ns in list(self._loops):
            self._stop_loop(ns)

    def session(self, ns: str) -> requests.Session:
        return self._sessions[ns]

    def reconcile(self) -> None:
        """Watch Secrets in exactly the namespaces the Gateways need; drop the others' Secrets.

        Level-triggered: runs on every Gateway (or Secret) change, so Secrets that came from
        the cache, or from a loop that was stopped, never outlive their namespace's need.
        """
        wanted = {ns for ns in self.rule(self.store.list("Gateway")) if ns}
        for ns in sorted(wanted - set(self._loops)):
            self._start_loop(ns)
        for ns in sorted(set(self._loops) - wanted):
            self._stop_loop(ns)
        stray = {o.meta.namespace for o in self.store.list(SECRET)} - wanted
        for ns in sorted(stray):
            replace_in_namespace(self.store, SECRET, ns, [])

    def _start_loop(self, ns: str) -> None:
        log.info("Secrets: watching namespace %s (a Gateway there names a TLS credential)", ns)
        st = self._machine(ns)
        self.states[ns] = st
        self._sessions[ns] = self._new_session()
        self._loops[ns] = tasks.spawn_forever(f"kube-Secret-{ns}",
                                              functools.partial(self._run, st), backoff=5.0)

    def _stop_loop(self, ns: str) -> None:
        log.info("Secrets: no Gateway in namespace %s needs them any more; watch stopped", ns)
        self._loops.pop(ns).kill(timeout=2)
        self._sessions.pop(ns).close()
        self.states.pop(ns, None)
        replace_in_namespace(self.store, SECRET, ns, [])
