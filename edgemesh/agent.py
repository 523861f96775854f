"""Assembly of a running node: store, metadata sources, admin endpoint and the enabled modules.

``edgemesh agent`` and ``edgemesh gateway`` both come through ``run``; they differ only in the
modules their config enables. Modules are imported only when enabled, so a node that runs DNS
alone never loads the proxy's or the tunnel's code.
"""
from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from edgemesh import __version__
from edgemesh.config import Config, EdgeGateway, KubeAPIConfig
from edgemesh.context import Context, Module, Role
from edgemesh.meta import kinds, models
from edgemesh.meta.store import Store
from edgemesh.runtime import heap, lifecycle, metrics
from edgemesh.runtime.admin import Admin, runtime_view

log = logging.getLogger(__name__)

# Enabled-by-config modules, in start order: (config section, "module.path:factory").
# A factory takes the Context and returns a Module. The tunnel comes first: once built it is
# attached to the context's dialer, which the proxy, DNS and the gateway dial through.
TUNNEL = ("edgeTunnel", "edgemesh.tunnel.module:build")
MODULES: list[tuple[str, str]] = [
    TUNNEL,
    ("edgeProxy", "edgemesh.proxy.module:build"),
    ("edgeDNS", "edgemesh.dns.module:build"),
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
    ctx.admin.add_view("node", lambda: {"node": ctx.node_name, "role": ctx.role.value,
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


class Source(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


def start_sources(api: KubeAPIConfig, store: Store, admin: Admin, state_dir: str,
                  gateway: EdgeGateway) -> list[Source]:
    """Choose and start the metadata sources for a node, from its config.

    - ``kubeAPIConfig.manifests`` set → the files source (standalone, no cluster);
    - else ``kubeConfig`` or ``master`` → list+watch from that API server;
    - else in a pod (``KUBERNETES_SERVICE_HOST``) → list+watch in-cluster;
    - else the KubeEdge edge metaServer (``kubeAPIConfig.metaServer.server``).

    A gateway's kube source also watches Secrets, per namespace: only where Gateways that
    select this gateway (``modules.edgeGateway.labels``) name a ``tls.credentialName``. API
    sources are paired with the cache in ``state_dir``: the last good state is served while
    the API is unreachable. (Imported here, not at the top: ``edgemesh version`` stays light.)
    """
    if api.manifests:
        from edgemesh.meta.files import FilesSource
        source: Source = FilesSource(store, api.manifests)
        log.info("metadata from manifests in %s", ", ".join(api.manifests))
    else:
        from edgemesh.meta.kube import KubeSource, connection_from_config
        conn = connection_from_config(api, in_cluster="KUBERNETES_SERVICE_HOST" in os.environ)
        log.info("metadata by list+watch from %s", conn.base_url)
        source = KubeSource(store, conn, state_dir=state_dir, admin=admin,
                            backoff_max=api.resyncBackoffMaxSeconds, secrets=gateway.enable,
                            secret_namespaces=gateway_secret_namespaces(gateway.labels))
    source.start()
    return [source]


def gateway_secret_namespaces(labels: dict[str, str]) -> Callable[[Iterable[Any]], set[str]]:
    """Namespaces of the Gateways that select this gateway and name a TLS Secret."""
    def namespaces(gateways: Iterable[Any]) -> set[str]:
        from edgemesh.gateway.tls import secret_namespaces
        return secret_namespaces(gateways, labels)
    return namespaces


class Node:
    """One agent or gateway: sources, then the enabled modules (``MODULES`` order)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.targets = enabled_modules(ctx.config)
        self.modules: list[Module] = []
        self.sources: list[Source] = []
        self.first_load = heap.FirstLoad(ctx.store, on_release=models.forget_shared)
        # Not ready until every enabled module has started: a probe must never pass between.
        ctx.admin.add_check("modules", lambda: "" if len(self.modules) == len(self.targets)
                            else f"starting modules ({len(self.modules)} of "
                                 f"{len(self.targets)} up)")

    def start(self) -> None:
        ctx = self.ctx
        self.first_load.hold()  # no cyclic collection while the first state loads
        self.sources = start_sources(ctx.config.kubeAPIConfig, ctx.store, ctx.admin,
                                     ctx.state_dir, ctx.config.modules.edgeGateway)
        for target in self.targets:
            module = load_module(target, ctx)
            if target == TUNNEL[1]:
                ctx.attach_tunnel(module)  # type: ignore[arg-type]
            module.start()
            self.modules.append(module)
            log.info("module %s started", module.name)
        log.info("edgemesh %s %s running as node %s", ctx.role.value, __version__,
                 ctx.node_name)

    def stop(self) -> None:
        for module in reversed(self.modules):
            try:
                module.stop()
            except Exception:
                log.exception("module %s failed to stop cleanly", module.name)
        for source in self.sources:
            source.stop()
        self.first_load.release()


def run(config: Config, role: str = "agent") -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    ctx = Context(config=config, store=Store(), admin=Admin(), role=Role(role))
    _register_views(ctx)
    return lifecycle.serve(role, ctx.admin, config.commonConfig.adminAddress, Node(ctx))
