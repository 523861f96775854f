"""Edge CNI (issue 17): the pod map (Pod IP → node, sans-IO) and the receiving side's rule
that a peer may dial this node's own Pods, at any port, and nothing else."""
from __future__ import annotations

import ipaddress
from typing import Any

from edgemesh.meta import models
from edgemesh.meta.store import Store
from edgemesh.proxy.podmap import PodMap, routed_networks
from edgemesh.tunnel.frames import Proto, Target
from edgemesh.tunnel.policy import LocalEndpoints


def slice_doc(name: str, endpoints: list[tuple[str, str, str | None]]) -> dict[str, Any]:
    """An EndpointSlice of ``(address, node, targetRef kind or None)`` endpoints."""
    eps = []
    for ip, node, kind in endpoints:
        ep: dict[str, Any] = {"addresses": [ip], "nodeName": node}
        if kind:
            ep["targetRef"] = {"kind": kind, "namespace": "default", "name": f"p-{ip}"}
        eps.append(ep)
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 80, "protocol": "TCP"}],
            "endpoints": eps}


def node_doc(name: str, cidrs: list[str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "spec": {"podCIDRs": cidrs}}


def pod_doc(name: str, node: str, ip: str, host_network: bool = False) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": node, "hostNetwork": host_network},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]}}


def sample() -> PodMap:
    slices = [models.parse_endpoint_slice(slice_doc("db", [
        ("10.244.1.5", "a1", "Pod"), ("10.244.2.7", "b1", "Pod"),
        ("192.168.20.9", "b1", None),  # a hand-written endpoint: no Pod, not in the map
        ("10.9.0.3", "b1", "Pod"), ("not-an-ip", "b1", "Pod"),
        ("192.168.20.2", "b1", "Pod")]))]  # a hostNetwork Pod's endpoint: b1's address
    pods = [models.parse_pod(pod_doc("solo", "b1", "10.9.0.4")),
            models.parse_pod(pod_doc("hostnet", "b1", "192.168.20.2", host_network=True))]
    nodes = [models.parse_node(node_doc("a1", ["10.244.1.0/24"])),
             models.parse_node({**node_doc("b1", ["10.244.2.0/24"]), "status": {
                 "addresses": [{"type": "InternalIP", "address": "192.168.20.2"}]}}),
             models.parse_node({"kind": "Node", "metadata": {"name": "c1"},
                                "spec": {"podCIDR": "10.244.3.0/24"}})]
    return PodMap.build(slices, pods, nodes)


def test_pod_ips_come_from_pod_endpoints_pods_and_node_ranges() -> None:
    pods = sample()
    assert pods.node_of("10.244.2.7") == "b1"
    assert pods.node_of("10.9.0.3") == "b1" and pods.node_of("10.9.0.4") == "b1"
    assert pods.node_of("10.244.2.99") == "b1"  # in b1's podCIDR, behind no Service
    assert pods.node_of("10.244.3.8") == "c1"  # spec.podCIDR (single) read too
    assert pods.node_of("10.244.2.0") is None and pods.node_of("10.244.2.255") is None
    assert pods.node_of("192.168.20.9") is None  # no targetRef Pod
    assert pods.node_of("192.168.20.2") is None  # the node's address (hostNetwork), no Pod
    assert pods.node_of("10.8.0.1") is None and pods.node_of("garbage") is None


def test_remote_ranges_skip_own_pods_and_routed_networks() -> None:
    pods = sample()
    # a1 intercepts the other nodes' ranges and b1's Pods outside them; not its own
    assert pods.remote_ranges("a1") == {"10.244.2.0/24", "10.244.3.0/24", "10.9.0.3/32",
                                        "10.9.0.4/32"}
    routes = routed_networks([
        {"dst": "default", "gateway": "192.168.10.1"},
        {"dst": "10.244.3.0/24", "gateway": "192.168.10.7"},  # a CNI's route to c1's Pods
        {"dst": "10.9.0.0/16", "dev": "eth1", "scope": "link"},  # on-link
        {"dst": "10.244.2.0/24", "type": "unreachable"},  # no route, in effect
        {"dst": "bogus"}])
    assert routes == [ipaddress.ip_network("10.244.3.0/24"), ipaddress.ip_network("10.9.0.0/16")]
    assert pods.remote_ranges("a1", routes) == {"10.244.2.0/24"}
    assert "10.244.1.0/24" in pods.remote_ranges("b1")


def test_a_pod_ip_inside_the_own_range_is_not_intercepted() -> None:
    # b1's Pod IP reported by a stale slice within a1's own podCIDR: a1's kernel routes it
    pods = PodMap.build([models.parse_endpoint_slice(slice_doc("s", [
        ("10.244.1.9", "b1", "Pod")]))], (), [models.parse_node(node_doc("a1",
                                                                         ["10.244.1.0/24"]))])
    assert pods.remote_ranges("a1") == set()


def policy_store() -> Store:
    store = Store()
    for doc in [slice_doc("db", [("10.244.2.7", "b1", "Pod"), ("10.244.1.5", "a1", "Pod"),
                                 ("192.168.20.2", "b1", "Pod"),  # lists the node's own IP
                                 ("127.0.0.1", "b1", "Pod")])]:
        store.upsert("EndpointSlice", models.parse_endpoint_slice(doc), doc)
    for node in [node_doc("b1", ["10.244.2.0/24"])]:
        store.upsert("Node", models.parse_node(node), node)
    return store


def test_receiving_agent_dials_its_own_pods_at_any_port_and_nothing_else() -> None:
    host = {"192.168.20.2", "10.244.2.1", "127.0.0.1"}  # b1's own addresses (cni0 gateway)
    calls = []

    def addresses() -> set[str]:
        calls.append(1)
        return host
    policy = LocalEndpoints(policy_store(), "b1", pods=True, host_addresses=addresses)
    assert policy.allows(Target(Proto.TCP, "10.244.2.7", 9100))
    assert policy.allows(Target(Proto.UDP, "10.244.2.7", 53))
    assert policy.allows(Target(Proto.TCP, "10.244.2.50", 22))  # in b1's podCIDR
    for ip in ("10.244.1.5",  # a1's Pod
               "10.244.2.1",  # the bridge gateway: the host itself
               "192.168.20.2", "127.0.0.1",  # the node's own addresses, whatever slices say
               "10.244.2.0", "192.168.20.9", "8.8.8.8"):
        assert not policy.allows(Target(Proto.TCP, ip, 22)), ip
    assert policy.allows(Target(Proto.TCP, "10.244.2.7", 80))  # still a service endpoint
    assert len(calls) == 1  # host addresses read at most every 10 s


def test_without_the_edge_cni_only_service_endpoints_are_dialled() -> None:
    policy = LocalEndpoints(policy_store(), "b1", host_addresses=set)
    assert not policy.allows(Target(Proto.TCP, "10.244.2.7", 9100))
    assert not policy.allows(Target(Proto.TCP, "10.244.2.50", 80))
