"""Which load-balancing spec a service port gets, and the per-port balancers that apply it.

Precedence, from strongest: the port-level or rule-level ``trafficPolicy.loadBalancer`` of the
DestinationRule whose ``spec.host`` names the service — or, when none does, the rule with the
service's own name, as the Go EdgeMesh matched them (``Store.destination_rule_match``) — then
``modules.edgeProxy.loadBalancer.defaultPolicy``. ``sessionAffinity: ClientIP`` with its
``timeoutSeconds`` overlays whatever policy results, as kube-proxy does.

``Balancers`` keeps one ``lb.Balancer`` per (namespace, name, port) and rebuilds one when its
spec changes. It is the entry point for every protocol: the TCP and UDP shells here, and the
HTTP layer, which passes header or cookie values as keys.
"""
from __future__ import annotations

from typing import TypeVar

from edgemesh.config import EdgeProxy
from edgemesh.meta.istio import LoadBalancerSettings
from edgemesh.meta.models import Service, ServicePort
from edgemesh.meta.store import Store
from edgemesh.proxy.lb import Balancer, HashKey, LBSpec, Policy, RingParams


def ring_params(config: EdgeProxy) -> RingParams:
    ch = config.loadBalancer.consistentHash
    return _shared(RingParams(ch.partitionCount, ch.replicationFactor, ch.load))


_SHARED: dict[object, object] = {}
T = TypeVar("T")


def _shared(value: T) -> T:
    """One instance of each distinct (frozen) value: 10,000 ports without a DestinationRule
    share one spec instead of holding 10,000 equal ones."""
    if len(_SHARED) > 4096:
        _SHARED.clear()
    return _SHARED.setdefault(value, value)  # type: ignore[return-value]


def _from_settings(settings: LoadBalancerSettings | None, default: Policy,
                   ring: RingParams, prefer_local: bool) -> LBSpec:
    if settings is None:
        return _shared(LBSpec(default, ring=ring, prefer_local=prefer_local))
    ch = settings.consistent_hash
    if ch is not None:
        if ch.use_source_ip:
            key, name = HashKey.SOURCE_IP, ""
        elif ch.http_header_name:
            key, name = HashKey.HTTP_HEADER, ch.http_header_name
        elif ch.http_cookie is not None:
            key, name = HashKey.HTTP_COOKIE, ch.http_cookie.name
        else:
            key, name = HashKey.HTTP_QUERY, ch.http_query_parameter_name
        return LBSpec(Policy.CONSISTENT_HASH, key, name, ring=ring, prefer_local=prefer_local)
    simple = settings.simple
    policy = Policy(simple) if simple in ("ROUND_ROBIN", "RANDOM", "LEAST_REQUEST") else default
    return LBSpec(policy, ring=ring, prefer_local=prefer_local)


def spec_for(store: Store, service: Service, port: ServicePort, config: EdgeProxy) -> LBSpec:
    """The balancing spec of one service port (see the module docstring for precedence)."""
    lb = config.loadBalancer
    dr = store.destination_rule_for(service)
    settings = dr.policy_for(port.port) if dr is not None else None
    spec = _from_settings(settings, Policy(lb.defaultPolicy), ring_params(config),
                          lb.preferLocal)
    if service.session_affinity == "ClientIP":
        spec = LBSpec(spec.policy, spec.hash_key, spec.hash_name,
                      float(service.affinity_timeout or 10800), spec.ring, spec.prefer_local)
    return spec


PortKey = tuple[str, str, int]  # (namespace, name, service port)


class Balancers:
    """One Balancer per service port, kept across updates while the spec stays the same."""

    def __init__(self, store: Store, config: EdgeProxy, node_name: str) -> None:
        self.store = store
        self.config = config
        self.node_name = node_name
        self._by_port: dict[PortKey, Balancer] = {}

    def get(self, service: Service, port: ServicePort) -> Balancer:
        """The balancer of ``port`` of ``service``, rebuilt if its spec changed."""
        key = (service.meta.namespace, service.meta.name, port.port)
        spec = spec_for(self.store, service, port, self.config)
        current = self._by_port.get(key)
        if current is None or current.spec != spec:
            current = self._by_port[key] = Balancer(spec, self.node_name)
        return current

    def discard(self, key: PortKey) -> None:
        """Forget the balancer of one port that no longer exists."""
        self._by_port.pop(key, None)

    def retain(self, keys: set[PortKey]) -> None:
        """Forget balancers of ports that no longer exist."""
        for key in list(self._by_port):
            if key not in keys:
                del self._by_port[key]
