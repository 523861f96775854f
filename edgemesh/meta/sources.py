"""Choose and start the metadata sources for a node, from its config.

- ``kubeAPIConfig.manifests`` set → the files source (standalone, no cluster);
- else ``kubeConfig`` or ``master`` → list+watch from that API server;
- else in a pod (``KUBERNETES_SERVICE_HOST``) → list+watch in-cluster;
- else the KubeEdge edge metaServer (``kubeAPIConfig.metaServer.server``).

A gateway's kube source also watches Secrets, per namespace: only where Gateways that select
this gateway (``modules.edgeGateway.labels``) name a ``tls.credentialName``.

API sources are paired with the cache in ``commonConfig.stateDir``: the last good state is
served while the API is unreachable.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from edgemesh.agent import Context

log = logging.getLogger(__name__)


class Source(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


def start(ctx: "Context") -> list[Source]:
    api = ctx.config.kubeAPIConfig
    if api.manifests:
        from edgemesh.meta.files import FilesSource
        source: Source = FilesSource(ctx.store, api.manifests)
        log.info("metadata from manifests in %s", ", ".join(api.manifests))
    else:
        from edgemesh.meta.kube import KubeSource, connection_from_config
        conn = connection_from_config(api, in_cluster="KUBERNETES_SERVICE_HOST" in os.environ)
        log.info("metadata by list+watch from %s", conn.base_url)
        gateway = ctx.config.modules.edgeGateway
        source = KubeSource(ctx.store, conn, state_dir=ctx.state_dir, admin=ctx.admin,
                            backoff_max=api.resyncBackoffMaxSeconds, secrets=gateway.enable,
                            secret_namespaces=_gateway_secret_namespaces(gateway.labels))
    source.start()
    return [source]


def _gateway_secret_namespaces(labels: dict[str, str]) -> Callable[[Iterable[Any]], set[str]]:
    """Namespaces of the Gateways that select this gateway and name a TLS Secret."""
    def namespaces(gateways: Iterable[Any]) -> set[str]:
        from edgemesh.gateway.tls import secret_namespaces
        return secret_namespaces(gateways, labels)
    return namespaces
