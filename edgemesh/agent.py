"""Assembly of a running node: store, metadata sources, admin endpoint and the enabled modules.

``edgemesh agent`` and ``edgemesh gateway`` both come through ``run``; they differ only in the
modules their config enables. Modules are imported only when enabled, so a node that runs DNS
alone never loads the proxy's or the tunnel's code.
"""
from __future__ import annotations

import importlib
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any, Protocol

import gevent
import gevent.event

from edgemesh import __version__
from edgemesh.config import Config
from edgemesh.meta import kinds
from edgemesh.meta.store import Store
from edgemesh.runtime import heap, metrics
from edgemesh.runtime.admin import Admin, runtime_view

log = logging.getLogger(__name__)

BUILD_INFO = metrics.gauge("edgemesh_build_info", "EdgeMesh version and role.",
                           ["version", "role"])


class Module(Protocol):
    """A part of the agent: started after the metadata sources, stopped in reverse order."""
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Context:
    """What every module is given: config, the store, the admin endpoint and shared services."""
    config: Config
    store: Store
    admin: Admin
    role: str = "agent"
    services: dict[str, Any] = field(default_factory=dict)  # shared parts: "dialer", "tunnel"

    @property
    def node_name(self) -> str:
        return self.config.nodeName

    @property
    def state_dir(self) -> str:
        return self.config.commonConfig.stateDir


# Enabled-by-config modules, in start order: (config section, "module.path:factory").
# A factory takes the Context and returns a Module. The tunnel comes before the proxy, DNS and
# gateway because they dial through it.
MODULES: list[tuple[str, str]] = [
    ("edgeTunnel", "edgemesh.tunnel.module:build"),
    ("edgeProxy", "edgemesh.proxy.module:build"),
    ("edgeDNS", "edgemesh.dns.module:build"),  # order: tunnel, proxy, dns, gateway
    ("edgeGateway", "edgemesh.gateway.module:build"),
]


def enabled_modules(config: Config) -> list[str]:
    return [target for section, target in MODULES
            if getattr(config.modules, section).enable]


def load_module(target: str, ctx: Context) -> Module:
    path, _, factory = target.partition(":")
    return getattr(importlib.import_module(path), factory)(ctx)  # type: ignore[no-any-return]


def _register_views(ctx: Context) -> None:
    store = ctx.store
    for kind in kinds.ALL:
        metrics.gauge("edgemesh_store_objects", "Objects in the metadata store by kind.",
                      ["kind"]).labels(kind.name).fn = (lambda k=kind.name: store.count(k))
    ctx.admin.add_check("metadata", lambda: "" if store.synced else "waiting for first sync")
    ctx.admin.add_view("services", lambda: services_view(store, ctx.node_name))
    ctx.admin.add_view("runtime", runtime_view)
    ctx.admin.add_view("node", lambda: {"node": ctx.node_name, "role": ctx.role,
                                        "version": __version__, "pid": os.getpid(),
                                        "stale": store.stale_reason,
                                        "synced": store.synced})


def services_view(store: Store, node_name: str) -> list[dict[str, Any]]:
    """The services the store knows, each port with its ready endpoints (``/debug/services``)."""
    out = []
    for svc in sorted(store.services(), key=lambda s: s.key):
        ports = []
        for p in svc.ports:
            backends = store.backends(svc, p)
            ports.append({"name": p.name, "port": p.port, "protocol": p.protocol,
                          "app": p.app.value,
                          "endpoints": [{"ip": b.ip, "port": b.port, "node": b.node_name,
                                         "local": b.node_name == node_name}
                                        for b in backends]})
        out.append({"namespace": svc.meta.namespace, "name": svc.meta.name, "type": svc.type,
                    "clusterIPs": list(svc.cluster_ips), "headless": svc.headless,
                    "externalName": svc.external_name, "ports": ports})
    return out


def run(config: Config, role: str = "agent") -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    from edgemesh.meta import sources  # noqa: PLC0415 (keeps `edgemesh version` light)

    ctx = Context(config=config, store=Store(), admin=Admin(), role=role)
    first_load = heap.FirstLoad(ctx.store)
    first_load.hold()  # no cyclic collection while the first state loads
    BUILD_INFO.labels(__version__, role).set(1)
    _register_views(ctx)
    stop = gevent.event.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(sig, stop.set)
    if config.commonConfig.adminAddress:
        host, port = ctx.admin.start(config.commonConfig.adminAddress)
        log.info("admin endpoint on http://%s:%d", host, port)
    targets = enabled_modules(config)
    modules: list[Module] = []
    # Not ready until every enabled module has started: a probe must never pass in between.
    ctx.admin.add_check("modules", lambda: "" if len(modules) == len(targets) else
                        f"starting modules ({len(modules)} of {len(targets)} up)")
    running_sources = sources.start(ctx)
    try:
        for target in targets:
            module = load_module(target, ctx)
            module.start()
            modules.append(module)
            log.info("module %s started", module.name)
        log.info("edgemesh %s %s running as node %s", role, __version__, ctx.node_name)
        stop.wait()
        log.info("stopping")
    finally:
        for module in reversed(modules):
            try:
                module.stop()
            except Exception:
                log.exception("module %s failed to stop cleanly", module.name)
        for source in running_sources:
            source.stop()
        ctx.admin.stop()
        first_load.release()
    return 0
