"""The kinds EdgeMesh understands: API paths, parsers, and how to recognise a manifest's kind."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgemesh.meta import istio, models


@dataclass(frozen=True)
class Kind:
    name: str  # "Service"
    group: str  # "" for core
    version: str
    plural: str
    namespaced: bool
    parse: Callable[[dict[str, Any]], Any]
    optional: bool = False  # a CRD that may be absent: 404 means "feature off"
    versions: tuple[str, ...] = ()  # other versions accepted in manifests

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str = "") -> str:
        """The list/watch URL path (cluster-wide, or in one namespace)."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        return f"{base}/namespaces/{namespace}/{self.plural}" if namespace else \
            f"{base}/{self.plural}"


SERVICE = Kind("Service", "", "v1", "services", True, models.parse_service)
ENDPOINT_SLICE = Kind("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices", True,
                      models.parse_endpoint_slice, versions=("v1beta1",))
ENDPOINTS = Kind("Endpoints", "", "v1", "endpoints", True, models.parse_endpoints)
POD = Kind("Pod", "", "v1", "pods", True, models.parse_pod)
NODE = Kind("Node", "", "v1", "nodes", False, models.parse_node)
NAMESPACE = Kind("Namespace", "", "v1", "namespaces", False, models.parse_namespace)
SECRET = Kind("Secret", "", "v1", "secrets", True, models.parse_secret)
DESTINATION_RULE = Kind("DestinationRule", "networking.istio.io", "v1beta1", "destinationrules",
                        True, istio.parse_destination_rule, optional=True,
                        versions=("v1alpha3", "v1"))
GATEWAY = Kind("Gateway", "networking.istio.io", "v1beta1", "gateways", True,
               istio.parse_gateway, optional=True, versions=("v1alpha3", "v1"))
VIRTUAL_SERVICE = Kind("VirtualService", "networking.istio.io", "v1beta1", "virtualservices",
                       True, istio.parse_virtual_service, optional=True,
                       versions=("v1alpha3", "v1"))

ALL: tuple[Kind, ...] = (SERVICE, ENDPOINT_SLICE, ENDPOINTS, POD, NODE, NAMESPACE, SECRET,
                         DESTINATION_RULE, GATEWAY, VIRTUAL_SERVICE)
BY_NAME: dict[str, Kind] = {k.name: k for k in ALL}


def kind_for(api_version: str, kind: str) -> Kind | None:
    """The Kind of a manifest's ``apiVersion``/``kind``, or None if EdgeMesh ignores it."""
    k = BY_NAME.get(kind)
    if k is None:
        return None
    group, _, version = api_version.rpartition("/")
    if group == k.group and version in (k.version, *k.versions):
        return k
    return None
