"""Typed, immutable models of the Kubernetes objects EdgeMesh reads, and their parsers.

Parsers take the JSON/YAML mapping of one object (as a list item, watch event object or
manifest document) and return a frozen dataclass. They are lenient where the API is (``null``
or absent slices and maps, absent conditions with their documented defaults) and strict where
a wrong type would mislead a consumer: a wrong shape raises ``ManifestError`` naming the field.
"""
from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import sys
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

from edgemesh.errors import ManifestError

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PROXY_NAME_LABEL = "service.edgemesh.kubeedge.io/service-proxy-name"
ANNOTATION_PREFIX = "edgemesh.kubeedge.io/"  # the only annotations kept (e.g. headless-proxy)


# ---- field readers ----------------------------------------------------------------------------

def _map(obj: Any, key: str, where: str) -> dict[str, Any]:
    value = obj.get(key) if isinstance(obj, dict) else None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ManifestError(f"{where}{key}: expected a mapping")
    return value


def _list(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ManifestError(f"{where}{key}: expected a list")
    return value


def _str(obj: dict[str, Any], key: str, where: str, default: str = "") -> str:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ManifestError(f"{where}{key}: expected a string, got {value!r}")
    return value


def _int(obj: dict[str, Any], key: str, where: str, default: int | None = None) -> int | None:
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"{where}{key}: expected an integer, got {value!r}")
    return value


def _bool(obj: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ManifestError(f"{where}{key}: expected true or false, got {value!r}")
    return value


def _strmap(obj: dict[str, Any], key: str, where: str) -> dict[str, str]:
    """A map of strings; numbers and booleans are taken as their text (``version: 1``)."""
    value = _map(obj, key, where)
    out = {}
    for k, v in value.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif not isinstance(v, (str, int, float)):
            raise ManifestError(f"{where}{key}.{k}: expected a string, got {v!r}")
        out[str(k)] = str(v)
    return out


# Many objects carry the same small values (namespaces, node names, protocols, the labels of a
# Deployment's Pods): one shared copy each instead of one per object. The tables are cleared
# when they grow past SHARED_LIMIT, so label churn cannot grow them without bound.
SHARED_LIMIT = 65536
_shared_maps: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
_shared_tuples: dict[tuple[Any, ...], tuple[Any, ...]] = {}
_EMPTY_MAP: dict[str, str] = {}  # shared by every object without labels; never mutated


def _empty_map() -> dict[str, str]:
    return _EMPTY_MAP


def shared_map(value: dict[str, str]) -> dict[str, str]:
    """One dict object for equal small maps (labels, selectors); callers never mutate it."""
    if not value:
        return _EMPTY_MAP
    key = tuple(value.items())
    found = _shared_maps.get(key)
    if found is None:
        if len(_shared_maps) >= SHARED_LIMIT:
            _shared_maps.clear()
        found = _shared_maps[key] = {sys.intern(k): sys.intern(v) for k, v in key}
    return found


def forget_shared() -> None:
    """Drop the sharing tables (the objects keep their shared values): called once a large
    first load is in, so the tables' own keys do not stay for the agent's lifetime."""
    _shared_maps.clear()
    _shared_tuples.clear()
    _shared_strs.clear()


# A Pod's name is also its endpoint's targetRef name: one string for both (~60 bytes each of
# 50,000 at 10k Services x 5). Unlike sys.intern, the table is dropped after the first load.
_shared_strs: dict[str, str] = {}


def shared_str(value: str) -> str:
    """One string object for equal names read from different documents."""
    found = _shared_strs.get(value)
    if found is None:
        if len(_shared_strs) >= SHARED_LIMIT:
            _shared_strs.clear()
        found = _shared_strs[value] = value
    return found


def shared_tuple(value: tuple[Any, ...]) -> tuple[Any, ...]:
    """One tuple object for equal tuples of hashable values (ports, address lists)."""
    found = _shared_tuples.get(value)
    if found is None:
        if len(_shared_tuples) >= SHARED_LIMIT:
            _shared_tuples.clear()
        found = _shared_tuples[value] = value
    return found


def _strs(obj: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    items = _list(obj, key, where)
    if not all(isinstance(i, str) for i in items):
        raise ManifestError(f"{where}{key}: expected a list of strings")
    return tuple(items)


# ---- quick construction ------------------------------------------------------------------------

_T = TypeVar("_T")
_FACTORY = object()  # "call the field's default_factory"


def quick_init(cls: type[_T]) -> type[_T]:
    """Give a frozen, slotted dataclass an ``__init__`` that stores through the slots'
    descriptors: the same parameters and instances (still frozen, hashable), built ~2x faster
    than dataclasses' ``object.__setattr__`` per field (a 10k-Service load builds ~300,000)."""
    params, body = [], []
    env: dict[str, Any] = {"_FACTORY": _FACTORY}
    for f in fields(cls):  # type: ignore[arg-type]
        env[f"_set_{f.name}"] = getattr(cls, f.name).__set__
        if f.default is not MISSING:
            env[f"_dflt_{f.name}"] = f.default
            params.append(f"{f.name}=_dflt_{f.name}")
        elif f.default_factory is not MISSING:
            env[f"_make_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_FACTORY")
            body.append(f"    if {f.name} is _FACTORY:\n        {f.name} = _make_{f.name}()")
        else:
            params.append(f.name)
        body.append(f"    _set_{f.name}(self, {f.name})")
    exec(f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body), env)  # noqa: S102
    env["__init__"].__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = env["__init__"]  # type: ignore[method-assign]
    return cls


# ---- metadata ---------------------------------------------------------------------------------

@quick_init
@dataclass(frozen=True, slots=True)
class ObjectMeta:
    name: str
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    # one shared empty map by default (never mutated): 64 bytes per object otherwise
    labels: dict[str, str] = field(default_factory=_empty_map, hash=False, compare=True)
    annotations: dict[str, str] = field(default_factory=_empty_map, hash=False, compare=True)
    # parse_meta validates annotations and keeps only EdgeMesh's own (ANNOTATION_PREFIX)


def parse_meta(obj: dict[str, Any], namespaced: bool = True) -> ObjectMeta:
    if not isinstance(obj, dict):
        raise ManifestError("object: expected a mapping")
    m = _map(obj, "metadata", "")
    name = _str(m, "name", "metadata.")
    if not name:
        raise ManifestError("metadata.name: required")
    namespace = _str(m, "namespace", "metadata.", "default" if namespaced else "")
    annotations = _EMPTY_MAP
    if m.get("annotations") is not None:
        # validated; only EdgeMesh's own are kept (kubectl's last-applied-configuration
        # would be a second copy of every manifest)
        kept = {k: v for k, v in _strmap(m, "annotations", "metadata.").items()
                if k.startswith(ANNOTATION_PREFIX)}
        annotations = shared_map(kept) if kept else _EMPTY_MAP
    return ObjectMeta(name=shared_str(name), namespace=sys.intern(namespace) if namespaced else "",
                      uid=_str(m, "uid", "metadata."),
                      resource_version=_str(m, "resourceVersion", "metadata."),
                      labels=shared_map(_strmap(m, "labels", "metadata.")),
                      annotations=annotations)


# ---- Service ----------------------------------------------------------------------------------

class AppProtocol(enum.Enum):
    """What a port carries, as the proxy needs to know it."""
    TCP = "tcp"
    UDP = "udp"
    SCTP = "sctp"
    HTTP = "http"
    HTTPS = "https"
    WS = "ws"
    GRPC = "grpc"
    HTTP2 = "http2"


_NAME_PREFIXES = {"http": AppProtocol.HTTP, "https": AppProtocol.HTTPS, "tcp": AppProtocol.TCP,
                  "udp": AppProtocol.UDP, "ws": AppProtocol.WS, "wss": AppProtocol.HTTPS,
                  "grpc": AppProtocol.GRPC, "grpc-web": AppProtocol.HTTP,
                  "http2": AppProtocol.HTTP2, "h2c": AppProtocol.HTTP2, "tls": AppProtocol.HTTPS}


def app_protocol_of(app_protocol: str, name: str, protocol: str) -> AppProtocol:
    """``appProtocol``, else the port name (``grpc-web``) or its prefix (``http``, ``http-0``),
    else ``protocol``.

    Names and ``appProtocol`` only refine a TCP port into what it carries: a UDP or SCTP port
    is what its protocol says, and a TCP port named ``udp-...`` is still TCP.
    """
    if protocol in ("UDP", "SCTP"):
        return AppProtocol(protocol.lower())
    for text in (app_protocol.lower().rsplit("/", 1)[-1], name.lower(),
                 name.lower().split("-", 1)[0]):
        found = _NAME_PREFIXES.get(text)
        if found is not None and found is not AppProtocol.UDP:
            return found
    return AppProtocol.TCP


@quick_init
@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    protocol: str  # TCP | UDP | SCTP
    port: int
    target_port: int | str
    node_port: int | None = None
    app_protocol: str = ""

    @property
    def app(self) -> AppProtocol:
        return app_protocol_of(self.app_protocol, self.name, self.protocol)


@dataclass(frozen=True, slots=True)
class LoadBalancerIngress:
    """One ``status.loadBalancer.ingress[]`` entry. ``ip_mode`` ``Proxy`` means the load
    balancer does not deliver packets with the IP as destination, so it is not intercepted."""
    ip: str = ""
    hostname: str = ""
    ip_mode: str = ""  # "" (VIP before Kubernetes 1.29) | "VIP" | "Proxy"


@quick_init
@dataclass(frozen=True, slots=True)
class Service:
    meta: ObjectMeta
    type: str = "ClusterIP"
    cluster_ips: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    selector: dict[str, str] | None = field(default=None, compare=True)
    external_name: str = ""
    session_affinity: str = "None"
    affinity_timeout: int = 10800
    publish_not_ready: bool = False
    external_ips: tuple[str, ...] = ()
    load_balancer_ingress: tuple[LoadBalancerIngress, ...] = ()

    @property
    def headless(self) -> bool:
        return self.type != "ExternalName" and (not self.cluster_ips or
                                                self.cluster_ips[0] == "None")

    @property
    def key(self) -> tuple[str, str]:
        return (self.meta.namespace, self.meta.name)

    def port_named(self, name: str) -> ServicePort | None:
        return next((p for p in self.ports if p.name == name), None)


def _parse_port(p: Any, i: int) -> ServicePort:
    where = f"spec.ports[{i}]."
    if not isinstance(p, dict):
        raise ManifestError(f"spec.ports[{i}]: expected a mapping")
    number = _int(p, "port", where)
    if number is None or not 1 <= number <= 65535:
        raise ManifestError(f"{where}port: expected an integer 1-65535, got {p.get('port')!r}")
    protocol = _str(p, "protocol", where, "TCP").upper()
    if protocol not in ("TCP", "UDP", "SCTP"):
        raise ManifestError(f"{where}protocol: expected TCP, UDP or SCTP, got {protocol!r}")
    target = p.get("targetPort", number)
    if target is None or target == "" or target == 0:
        target = number
    if not isinstance(target, (int, str)) or isinstance(target, bool):
        raise ManifestError(f"{where}targetPort: expected an integer or a port name")
    return ServicePort(name=_str(p, "name", where), protocol=protocol, port=number,
                       target_port=target, node_port=_int(p, "nodePort", where),
                       app_protocol=_str(p, "appProtocol", where))


def _parse_lb_ingress(obj: dict[str, Any]) -> tuple[LoadBalancerIngress, ...]:
    where = "status.loadBalancer."
    ingress = _list(_map(_map(obj, "status", ""), "loadBalancer", "status."), "ingress", where)
    out = []
    for i, item in enumerate(ingress):
        at = f"{where}ingress[{i}]."
        if not isinstance(item, dict):
            raise ManifestError(f"{where}ingress[{i}]: expected a mapping")
        ip = _str(item, "ip", at)
        if ip:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ManifestError(f"{at}ip: expected an IP address, got {ip!r}") from None
        out.append(LoadBalancerIngress(ip=ip, hostname=_str(item, "hostname", at),
                                       ip_mode=_str(item, "ipMode", at)))
    return tuple(out)


def parse_service(obj: dict[str, Any]) -> Service:
    meta = parse_meta(obj)
    spec = _map(obj, "spec", "")
    svc_type = _str(spec, "type", "spec.", "ClusterIP")
    ips = _strs(spec, "clusterIPs", "spec.") or ((_str(spec, "clusterIP", "spec."),)
                                                 if spec.get("clusterIP") else ())
    ports = tuple(_parse_port(p, i) for i, p in enumerate(_list(spec, "ports", "spec.")))
    affinity = _map(_map(spec, "sessionAffinityConfig", "spec."), "clientIP",
                    "spec.sessionAffinityConfig.")
    selector = spec.get("selector")
    if selector is not None and not isinstance(selector, dict):
        raise ManifestError("spec.selector: expected a mapping")
    if svc_type == "ExternalName" and not spec.get("externalName"):
        raise ManifestError("spec.externalName: required for type ExternalName")
    return Service(meta=meta, type=sys.intern(svc_type), cluster_ips=ips,
                   ports=shared_tuple(ports),
                   selector=shared_map({str(k): str(v) for k, v in selector.items()})
                   if selector else None,
                   external_name=_str(spec, "externalName", "spec.").rstrip("."),
                   session_affinity=_str(spec, "sessionAffinity", "spec.", "None"),
                   affinity_timeout=_int(affinity, "timeoutSeconds",
                                                "spec.sessionAffinityConfig.clientIP.",
                                                10800) or 10800,
                   publish_not_ready=_bool(spec, "publishNotReadyAddresses", "spec.", False),
                   external_ips=_strs(spec, "externalIPs", "spec."),
                   load_balancer_ingress=_parse_lb_ingress(obj))


# ---- EndpointSlice / Endpoints ----------------------------------------------------------------

@quick_init
@dataclass(frozen=True, slots=True)
class TargetRef:
    kind: str
    namespace: str
    name: str


@quick_init
@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    port: int | None
    protocol: str = "TCP"
    app_protocol: str = ""


@quick_init
@dataclass(frozen=True, slots=True)
class Endpoint:
    addresses: tuple[str, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    hostname: str = ""
    node_name: str = ""
    zone: str = ""
    target_ref: TargetRef | None = None
    # core/v1 Endpoints: the ports of this address's subset (subsets may differ in ports);
    # None for EndpointSlice endpoints, which use the slice's ports.
    ports: tuple[EndpointPort, ...] | None = None


@quick_init
@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """An EndpointSlice, or a core/v1 Endpoints object converted to the same shape."""
    meta: ObjectMeta
    service_name: str
    address_type: str = "IPv4"
    endpoints: tuple[Endpoint, ...] = ()
    ports: tuple[EndpointPort, ...] = ()


def _target_ref(obj: dict[str, Any], where: str) -> TargetRef | None:
    ref = _map(obj, "targetRef", where)
    if not ref:
        return None
    return TargetRef(kind=sys.intern(_str(ref, "kind", where)),
                     namespace=sys.intern(_str(ref, "namespace", where)),
                     name=shared_str(_str(ref, "name", where)))


def _endpoint_port(p: Any, where: str) -> EndpointPort:
    """One port; ``where`` is its path with a trailing dot (``ports[0].``)."""
    if not isinstance(p, dict):
        raise ManifestError(f"{where.rstrip('.')}: expected a mapping")
    return EndpointPort(name=sys.intern(_str(p, "name", where)), port=_int(p, "port", where),
                        protocol=sys.intern(_str(p, "protocol", where, "TCP")),
                        app_protocol=_str(p, "appProtocol", where))


def parse_endpoint_slice(obj: dict[str, Any]) -> EndpointSlice:
    meta = parse_meta(obj)
    endpoints = []
    for i, e in enumerate(_list(obj, "endpoints", "")):
        where = f"endpoints[{i}]."
        if not isinstance(e, dict):
            raise ManifestError(f"endpoints[{i}]: expected a mapping")
        cond = _map(e, "conditions", where)
        at = where + "conditions."
        serving = _bool(cond, "serving", at, True)
        terminating = _bool(cond, "terminating", at, False)
        endpoints.append(Endpoint(
            addresses=shared_tuple(_strs(e, "addresses", where)),  # the Pod's pod_ips
            ready=_bool(cond, "ready", at, True),
            serving=serving, terminating=terminating,
            hostname=_str(e, "hostname", where),
            node_name=sys.intern(_str(e, "nodeName", where)),
            zone=sys.intern(_str(e, "zone", where)), target_ref=_target_ref(e, where)))
    ports = tuple(_endpoint_port(p, f"ports[{i}].") for i, p in enumerate(_list(obj, "ports", "")))
    return EndpointSlice(meta=meta, service_name=meta.labels.get(SERVICE_NAME_LABEL, ""),
                         address_type=sys.intern(_str(obj, "addressType", "", "IPv4")),
                         endpoints=tuple(endpoints), ports=shared_tuple(ports))


def parse_endpoints(obj: dict[str, Any]) -> EndpointSlice:
    """core/v1 Endpoints → one slice per object (``addresses`` ready, the rest not ready).

    Each endpoint keeps its subset's ports (a named target port may resolve differently in
    different subsets); the slice's ``ports`` is their union.
    """
    meta = parse_meta(obj)
    endpoints: list[Endpoint] = []
    ports: dict[tuple[str, int | None, str], EndpointPort] = {}
    for i, subset in enumerate(_list(obj, "subsets", "")):
        where = f"subsets[{i}]."
        if not isinstance(subset, dict):
            raise ManifestError(f"subsets[{i}]: expected a mapping")
        subset_ports = tuple(_endpoint_port(p, f"{where}ports[{j}].")
                             for j, p in enumerate(_list(subset, "ports", where)))
        for ep in subset_ports:
            ports.setdefault((ep.name, ep.port, ep.protocol), ep)
        for key, ready in (("addresses", True), ("notReadyAddresses", False)):
            for j, a in enumerate(_list(subset, key, where)):
                w = f"{where}{key}[{j}]."
                if not isinstance(a, dict) or not a.get("ip"):
                    raise ManifestError(f"{w}ip: required")
                endpoints.append(Endpoint(addresses=(_str(a, "ip", w),), ready=ready,
                                          serving=ready, hostname=_str(a, "hostname", w),
                                          node_name=_str(a, "nodeName", w),
                                          target_ref=_target_ref(a, w), ports=subset_ports))
    family = "IPv6" if endpoints and ":" in endpoints[0].addresses[0] else "IPv4"
    return EndpointSlice(meta=meta, service_name=meta.name, address_type=family,
                         endpoints=tuple(endpoints), ports=tuple(ports.values()))


# ---- Pod, Node, Namespace, Secret -------------------------------------------------------------

@quick_init
@dataclass(frozen=True, slots=True)
class Pod:
    meta: ObjectMeta
    node_name: str = ""
    hostname: str = ""
    subdomain: str = ""
    host_network: bool = False
    phase: str = ""
    pod_ips: tuple[str, ...] = ()
    ready: bool = False
    terminating: bool = False
    container_ports: tuple[tuple[str, int, str], ...] = ()  # (name, port, protocol)


def _pod_ip(item: dict[str, Any], i: int) -> str:
    ip = item["ip"]
    if not isinstance(ip, str):
        raise ManifestError(f"status.podIPs[{i}].ip: expected a string, got {ip!r}")
    return ip


def parse_pod(obj: dict[str, Any]) -> Pod:
    meta = parse_meta(obj)
    spec = _map(obj, "spec", "")
    status = _map(obj, "status", "")
    ips = tuple(_pod_ip(ip, i) for i, ip in enumerate(_list(status, "podIPs", "status."))
                if isinstance(ip, dict) and ip.get("ip"))
    if not ips and status.get("podIP"):
        ips = (_str(status, "podIP", "status."),)
    ips = shared_tuple(ips)  # also its endpoint's addresses
    ready = any(isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True"
                for c in _list(status, "conditions", "status."))
    cports = []
    for i, c in enumerate(_list(spec, "containers", "spec.")):
        for j, p in enumerate(_list(c if isinstance(c, dict) else {}, "ports", "")):
            if isinstance(p, dict) and p.get("containerPort") is not None:
                w = f"spec.containers[{i}].ports[{j}]."
                cports.append((sys.intern(_str(p, "name", w)),
                               _int(p, "containerPort", w) or 0,
                               sys.intern(_str(p, "protocol", w, "TCP"))))
    m = _map(obj, "metadata", "")
    return Pod(meta=meta, node_name=sys.intern(_str(spec, "nodeName", "spec.")),
               hostname=_str(spec, "hostname", "spec."),
               subdomain=_str(spec, "subdomain", "spec."),
               host_network=_bool(spec, "hostNetwork", "spec.", False),
               phase=sys.intern(_str(status, "phase", "status.")), pod_ips=ips, ready=ready,
               terminating=bool(m.get("deletionTimestamp")),
               container_ports=shared_tuple(tuple(cports)))


@dataclass(frozen=True, slots=True)
class Node:
    meta: ObjectMeta
    addresses: tuple[tuple[str, str], ...] = ()  # (type, address): InternalIP, ExternalIP, ...
    pod_cidrs: tuple[str, ...] = ()  # spec.podCIDRs (or spec.podCIDR), where the cluster sets it


def parse_node(obj: dict[str, Any]) -> Node:
    status = _map(obj, "status", "")
    addrs = tuple((_str(a, "type", f"status.addresses[{i}]."),
                   _str(a, "address", f"status.addresses[{i}]."))
                  for i, a in enumerate(_list(status, "addresses", "status."))
                  if isinstance(a, dict))
    spec = _map(obj, "spec", "")
    cidrs = tuple(c for c in _list(spec, "podCIDRs", "spec.") if isinstance(c, str) and c)
    if not cidrs and spec.get("podCIDR"):
        cidrs = (_str(spec, "podCIDR", "spec."),)
    return Node(meta=parse_meta(obj, namespaced=False), addresses=addrs, pod_cidrs=cidrs)


@dataclass(frozen=True, slots=True)
class Namespace:
    meta: ObjectMeta
    phase: str = "Active"


def parse_namespace(obj: dict[str, Any]) -> Namespace:
    status = _map(obj, "status", "")
    return Namespace(meta=parse_meta(obj, namespaced=False),
                     phase=_str(status, "phase", "status.", "Active"))


@dataclass(frozen=True, slots=True)
class Secret:
    meta: ObjectMeta
    type: str = "Opaque"
    data: dict[str, bytes] = field(default_factory=dict)


def parse_secret(obj: dict[str, Any]) -> Secret:
    data: dict[str, bytes] = {}
    for key, value in _map(obj, "data", "").items():
        if value is None:
            data[key] = b""
            continue
        try:
            data[key] = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ManifestError(f"data.{key}: not valid base64") from e
    for key, value in _map(obj, "stringData", "").items():
        data[key] = str(value).encode()
    return Secret(meta=parse_meta(obj), type=_str(obj, "type", "", "Opaque"), data=data)


Parser = Callable[[dict[str, Any]], Any]
