"""Edge CNI virtual addresses (issue 17 item 2): the meshCIDR allocator, Pod IPs shared by
several nodes in the pod map, the address plan per mode, and what DNS answers with it
(headless, hostnames, pod names, PTR, the headless-proxy annotation). Sans-IO."""
from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemesh import config
from edgemesh.config import check_mesh_cidr
from edgemesh.dns.records import ZoneIndex
from edgemesh.dns.zone import NXDOMAIN, T_A, T_PTR, T_SRV, resolve
from edgemesh.errors import ConfigError
from edgemesh.meta import models
from edgemesh.meta.store import Store
from edgemesh.proxy.meshcidr import (
    HEADLESS_PROXY_ANNOTATION,
    AddressPlan,
    Allocator,
    Mode,
    PodTarget,
    ServiceTarget,
    headless_proxied,
)
from edgemesh.proxy.podmap import PodMap, routed_networks
from edgemesh.tunnel.frames import Proto, Target
from edgemesh.tunnel.policy import LocalEndpoints

Z = "cluster.local"


# ---- the allocator -------------------------------------------------------------------------

def test_addresses_are_stable_and_independent_of_order() -> None:
    names = [f"default/web-{i}" for i in range(200)]
    a, b = Allocator.of("100.127.0.0/16"), Allocator.of("100.127.0.0/16")
    assert a.sync(names) == [] and b.sync(reversed(names)) == []
    assert a.assigned == b.assigned  # every node, whatever order it learnt the Pods in
    restarted = Allocator.of("100.127.0.0/16")
    restarted.sync(names)
    assert restarted.assigned == a.assigned  # and after a restart
    vip = a.address("default/web-7")
    assert vip is not None and ipaddress.ip_address(vip) in ipaddress.ip_network(
        "100.127.0.0/16")
    assert a.owner(vip) == "default/web-7"
    assert a.owner("100.126.0.1") is None and a.owner("garbage") is None
    a.sync([*names, "default/new"])  # a new Pod moves nobody
    assert {k: v for k, v in a.assigned.items() if k != "default/new"} == b.assigned


def test_collisions_probe_deterministically_and_release_frees() -> None:
    # a /29 has 6 addresses: 6 names collide often, and still each gets its own
    names = [f"ns/p{i}" for i in range(6)]
    a, b = Allocator.of("10.99.0.0/29"), Allocator.of("10.99.0.0/29")
    assert a.sync(names) == [] and b.sync(names[::-1]) == []
    assert a.assigned == b.assigned and len(set(a.assigned.values())) == 6
    assert set(a.assigned.values()) == set(range(1, 7))  # never network or broadcast
    kept = a.address("ns/p0")
    a.sync(names[:1])  # the other Pods deleted: released
    assert a.address("ns/p1") is None and a.address("ns/p0") == kept
    assert len(a.owners) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=0, max_size=40, unique=True),
       st.randoms(use_true_random=False))
def test_any_pods_in_any_order_get_the_same_unique_addresses(names: list[str],
                                                             rnd: Any) -> None:
    a, b = Allocator.of("10.99.0.0/26"), Allocator.of("10.99.0.0/26")  # 62 addresses
    a.sync(names)
    shuffled = names[:]
    rnd.shuffle(shuffled)
    b.sync(shuffled)
    assert a.assigned == b.assigned
    assert len(set(a.assigned.values())) == len(names)
    assert all(1 <= v <= 62 for v in a.assigned.values())


def test_a_full_range_places_no_more_and_counts() -> None:
    a = Allocator.of("10.99.0.0/30")  # 2 usable addresses
    unplaced = a.sync(["a/1", "a/2", "a/3", "a/4"])
    assert len(unplaced) == 2 and a.exhausted == 2 and len(a.assigned) == 2
    a.sync(["a/1", "a/2", "a/3", "a/4"])  # still full: counted again, no crash
    assert a.exhausted == 4
    for name in unplaced:
        assert a.address(name) is None


def test_mesh_cidr_is_validated_naming_the_key() -> None:
    assert check_mesh_cidr("100.127.0.0/16") is None
    assert check_mesh_cidr("10.250.0.0/16") is None
    for bad in ("8.8.0.0/16", "fd00::/64", "100.127.0.0/31", "127.0.0.0/8", "nope"):
        assert check_mesh_cidr(bad), bad
    with pytest.raises(ConfigError) as e:
        config.from_mapping({"modules": {"edgeCNI": {"meshCIDR": "8.8.8.0/24"}}})
    assert "modules.edgeCNI.meshCIDR" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config.from_mapping({"modules": {"edgeCNI": {"mode": "sometimes"}}})
    assert "modules.edgeCNI.mode" in str(e.value)
    cfg = config.from_mapping({}).modules.edgeCNI
    assert (cfg.meshCIDR, cfg.mode, cfg.headlessProxy) == ("100.127.0.0/16", "auto", False)


# ---- a two-node cluster of plain Docker nodes -----------------------------------------------

def ep(ip: str, node: str, pod: str, hostname: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"addresses": [ip], "nodeName": node,
                           "targetRef": {"kind": "Pod", "namespace": "default", "name": pod}}
    if hostname:
        out["hostname"] = hostname
    return out


def service(name: str, port: int, target: int, eps: list[dict[str, Any]],
            annotations: dict[str, str] | None = None) -> list[dict[str, Any]]:
    meta: dict[str, Any] = {"name": name, "namespace": "default"}
    if annotations:
        meta["annotations"] = annotations
    return [{"apiVersion": "v1", "kind": "Service", "metadata": meta,
             "spec": {"clusterIP": "None",
                      "ports": [{"name": "http-0", "port": port, "targetPort": target}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": f"{name}-1", "namespace": "default",
                          "labels": {"kubernetes.io/service-name": name}},
             "addressType": "IPv4",
             "ports": [{"name": "http-0", "port": target, "protocol": "TCP"}],
             "endpoints": eps}]


def cluster(annotate: str | None = "true") -> Store:
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}},
            *service("db", 5432, 5432, [ep("172.17.0.2", "a1", "db-0", "db-0"),
                                        ep("172.17.0.2", "b1", "db-1", "db-1"),
                                        ep("172.17.0.3", "b1", "db-2", "db-2")]),
            *service("nginx-svc", 12345, 80, [ep("172.17.0.4", "b1", "nginx-0")],
                     {HEADLESS_PROXY_ANNOTATION: annotate} if annotate else None)]
    store = Store()
    by_kind: dict[str, list[Any]] = {}
    from edgemesh.meta import kinds
    for doc in docs:
        kind = kinds.kind_for(doc["apiVersion"], doc["kind"])
        assert kind is not None
        by_kind.setdefault(kind.name, []).append((kind.parse(doc), doc))
    store.replace_many(by_kind)
    store.mark_synced()
    return store


def pod_map(store: Store) -> PodMap:
    return PodMap.build(store.list("EndpointSlice"), store.pods(), store.list("Node"))


def plan_for(store: Store, node: str = "a1", mode: Mode = Mode.AUTO,
             **kw: Any) -> AddressPlan:
    plan = AddressPlan(node, mode=mode)
    docker = routed_networks([{"dst": "172.17.0.0/16", "dev": "docker0", "scope": "link"}])
    proxied = [s.key for s in store.services() if headless_proxied(s, False)]
    plan.update(pod_map(store), headless_proxied=proxied, routed=docker,
                local={"172.17.0.1", "192.168.10.2"}, **kw)
    return plan


def test_shared_pod_ips_are_kept_per_node() -> None:
    pods = pod_map(cluster())
    assert pods.ips["172.17.0.2"] == {"a1": "default/db-0", "b1": "default/db-1"}
    assert pods.node_of("172.17.0.2") is None  # which one? neither by value
    assert pods.on_node("172.17.0.2", "a1") and pods.on_node("172.17.0.2", "b1")
    assert pods.node_of("172.17.0.3") == "b1"
    assert pods.pods["default/db-1"] == ("b1", "172.17.0.2")
    # a1 leaves its own 172.17.0.2 alone and intercepts nothing shared by value
    assert "172.17.0.2/32" not in pods.remote_ranges("a1")
    assert "172.17.0.3/32" in pods.remote_ranges("a1")  # without the Docker route


def test_the_receiving_agent_dials_its_own_pod_at_a_shared_ip() -> None:
    policy = LocalEndpoints(cluster(), "b1", pods=True, host_addresses=lambda: {"172.17.0.1"})
    assert policy.allows(Target(Proto.TCP, "172.17.0.2", 9100))
    assert not policy.allows(Target(Proto.TCP, "172.17.0.1", 22))  # the docker0 gateway
    assert not policy.allows(Target(Proto.TCP, "172.17.0.9", 22))  # no Pod


def test_auto_gives_vips_to_remote_pods_whose_ip_is_not_usable_here() -> None:
    plan = plan_for(cluster())
    vip1 = plan.address("b1", "172.17.0.2")
    vip2 = plan.address("b1", "172.17.0.3")
    assert vip1 != "172.17.0.2"  # shared with a1's own Pod
    assert vip2 != "172.17.0.3"  # in a1's Docker bridge network: would land there
    assert plan.address("a1", "172.17.0.2") == "172.17.0.2"  # own Pod: real, untouched
    assert plan.target(vip1) == PodTarget("b1", "172.17.0.2", "default/db-1")
    assert plan.target(plan.allocator.address("default/db-0") or "") is None  # own: not out
    # every node gives b1's Pod the same VIP
    assert plan_for(cluster(), node="c1").address("b1", "172.17.0.2") == vip1


def test_auto_keeps_a_unique_remote_ip_that_the_edge_cni_carries() -> None:
    plan = AddressPlan("a1")
    pods = pod_map(cluster())
    plan.update(pods, steered=["172.17.0.3/32"])  # a1 has no Docker route, no own Pods
    assert plan.address("b1", "172.17.0.3") == "172.17.0.3"
    assert plan.address("b1", "172.17.0.2") != "172.17.0.2"  # shared: by VIP anyway
    plan.update(pods)  # not carried (nor routed): the real IP reaches nothing from here
    assert plan.address("b1", "172.17.0.3") != "172.17.0.3"


def test_modes_podip_and_virtual() -> None:
    plan = plan_for(cluster(), mode=Mode.POD_IP)
    assert plan.address("b1", "172.17.0.2") == "172.17.0.2" and not plan.shown
    plan = AddressPlan("a1", mode=Mode.VIRTUAL)
    plan.update(pod_map(cluster()), steered=["172.17.0.3/32"])
    assert plan.address("b1", "172.17.0.3") != "172.17.0.3"


def test_a_deleted_or_moved_pod_loses_its_vip_in_one_update() -> None:
    store = cluster()
    plan = plan_for(store)
    vip = plan.address("b1", "172.17.0.3")
    version = plan.version
    doc = service("db", 5432, 5432, [ep("172.17.0.2", "a1", "db-0", "db-0"),
                                      ep("172.17.0.2", "b1", "db-1", "db-1"),
                                      ep("172.17.0.5", "a1", "db-2", "db-2")])[1]
    store.upsert("EndpointSlice", models.parse_endpoint_slice(doc), doc)  # db-2 moved to a1
    plan.update(pod_map(store), routed=routed_networks(
        [{"dst": "172.17.0.0/16", "dev": "docker0"}]))
    assert plan.target(vip) is None and plan.version > version
    assert plan.address("a1", "172.17.0.5") == "172.17.0.5"


# ---- DNS with the plan ---------------------------------------------------------------------

def answers(data: Any, name: str, qtype: int = T_A) -> list[str]:
    reply = resolve(data, name.split("."), qtype)
    assert reply is not None
    if reply.rcode == NXDOMAIN:
        return ["NXDOMAIN"]
    return sorted(str(rr.rdata) for rr in reply.answer)


def zone(store: Store, plan: AddressPlan | None) -> Any:
    index = ZoneIndex(Z, 30)
    index.data.addresses = plan
    return index, index.refresh(store, 1)


def test_dns_answers_vips_for_remote_pods_and_real_ips_for_own() -> None:
    store = cluster()
    plan = plan_for(store)
    _, data = zone(store, plan)
    v1, v2 = plan.address("b1", "172.17.0.2"), plan.address("b1", "172.17.0.3")
    assert answers(data, f"db.default.svc.{Z}") == sorted(["172.17.0.2", v1, v2])
    assert answers(data, f"db-1.db.default.svc.{Z}") == [v1]
    assert answers(data, f"db-0.db.default.svc.{Z}") == ["172.17.0.2"]
    # pod names: this node's own Pod at the address wins; a remote one by its VIP
    assert answers(data, f"172-17-0-2.default.pod.{Z}") == ["172.17.0.2"]
    assert answers(data, f"172-17-0-3.default.pod.{Z}") == [v2]
    srv = resolve(data, f"db.default.svc.{Z}".split("."), T_SRV)
    assert srv is not None and v1 in {str(rr.rdata) for rr in srv.additional}
    # PTR: a VIP names its Pod; the real IP only the Pod answered by it
    assert answers(data, ".".join(reversed(v1.split("."))) + ".in-addr.arpa", T_PTR) == \
        [f"db-1.db.default.svc.{Z}."]
    assert answers(data, "2.0.17.172.in-addr.arpa", T_PTR) == [f"db-0.db.default.svc.{Z}."]


def test_dns_without_the_plan_is_the_kubernetes_answer() -> None:
    store = cluster()
    _, data = zone(store, None)
    assert answers(data, f"db.default.svc.{Z}") == ["172.17.0.2", "172.17.0.3"]
    assert answers(data, f"db-1.db.default.svc.{Z}") == ["172.17.0.2"]
    assert answers(data, f"nginx-svc.default.svc.{Z}") == ["172.17.0.4"]
    _, data = zone(store, plan_for(store, mode=Mode.POD_IP))
    assert answers(data, f"db-1.db.default.svc.{Z}") == ["172.17.0.2"]


def test_headless_proxy_annotation_answers_a_balanced_vip() -> None:
    store = cluster("true")
    plan = plan_for(store)
    vip = plan.service_address("default", "nginx-svc")
    assert vip is not None and plan.target(vip) == ServiceTarget("default", "nginx-svc")
    _, data = zone(store, plan)
    assert answers(data, f"nginx-svc.default.svc.{Z}") == [vip]
    srv = answers(data, f"_http-0._tcp.nginx-svc.default.svc.{Z}", T_SRV)
    assert srv == [f"0 100 12345 nginx-svc.default.svc.{Z}."]  # the service port
    assert answers(data, ".".join(reversed(vip.split("."))) + ".in-addr.arpa", T_PTR) == \
        [f"nginx-svc.default.svc.{Z}."]
    # off (annotation "false", or absent with the default off): the Kubernetes answer
    for annotate in ("false", None):
        off = cluster(annotate)
        p = plan_for(off)
        assert p.service_address("default", "nginx-svc") is None
        _, data = zone(off, p)
        assert answers(data, f"nginx-svc.default.svc.{Z}") == [p.address("b1", "172.17.0.4")]
    svc = cluster(None).service("default", "nginx-svc")
    assert svc is not None and headless_proxied(svc, True)  # the config default on


def test_a_write_rebuilds_one_service_and_answers_follow_the_plan() -> None:
    store = cluster()
    plan = plan_for(store)
    index, data = zone(store, plan)
    built = index.rebuilt
    doc = service("db", 5432, 5432, [ep("172.17.0.2", "b1", "db-1", "db-1")])[1]
    store.upsert("EndpointSlice", models.parse_endpoint_slice(doc), doc)
    plan.update(pod_map(store))
    data = index.refresh(store, 2)
    assert index.rebuilt == built + 1  # only db's records
    assert answers(data, f"db-1.db.default.svc.{Z}") == [plan.address("b1", "172.17.0.2")]
    assert plan.address("b1", "172.17.0.2") != "172.17.0.2"  # no longer shared, not routed


# ---- the proxy's side: PodNetworks.sync with fake steering -----------------------------------

def pod_networks(store: Store, monkeypatch: pytest.MonkeyPatch, node: str = "a1",
                 cidr: str = "100.127.0.0/16") -> tuple[Any, list[tuple[str, str, str]]]:
    from types import SimpleNamespace

    from edgemesh.proxy import podip
    monkeypatch.setattr(podip, "route_table", lambda family=4: [
        {"dst": "172.17.0.0/16", "dev": "docker0", "scope": "link"}])
    calls: list[tuple[str, str, str]] = []

    def steer(protocol: str, net: str, ports: tuple[int, int], handler: Any) -> bool:
        calls.append(("steer", protocol, net))
        return True

    def unsteer(protocol: str, net: str) -> None:
        calls.append(("unsteer", protocol, net))
    proxy = SimpleNamespace(dialer=None)
    pods = podip.PodNetworks(store, node, proxy, steer, unsteer,  # type: ignore[arg-type]
                             plan=AddressPlan(node, cidr),
                             local_addresses=lambda: {"172.17.0.1"})
    return pods, calls


def test_one_rule_per_protocol_for_the_range_and_vips_go_within_one_sync(
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = cluster()
    pods, calls = pod_networks(store, monkeypatch)
    pods.sync()
    assert sorted(calls) == [("steer", "tcp", "100.127.0.0/16"),
                             ("steer", "udp", "100.127.0.0/16")]  # nothing per Pod
    vip = pods.plan.address("b1", "172.17.0.2")
    assert pods.udp_backends(vip, 53)[0].node_name == "b1"
    assert pods.udp_backends(vip, 53)[0].ip == "172.17.0.2"
    assert pods.remote_node("172.17.0.2") is None  # shared: never by value
    svc_vip = pods.plan.service_address("default", "nginx-svc")
    assert svc_vip and pods.tcp_port_for(svc_vip, 12345).backends[0].port == 80  # mapping
    assert pods.tcp_port_for(svc_vip, 80) is None  # not a service port
    view = pods.view()
    assert view["meshCIDR"] == "100.127.0.0/16" and view["virtualIPs"] >= 3
    told: list[int] = []
    pods.plan.listeners.append(lambda: told.append(1))
    pods.sync()
    assert told == []  # nothing changed: no replanning, DNS keeps its answers
    store.delete("EndpointSlice", "default", "db-1")  # every db Pod gone
    pods.sync()
    assert pods.plan.target(vip) is None and pods.udp_backends(vip, 53) == []
    assert told == [1]


def test_a_full_mesh_range_is_logged_and_counted(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from edgemesh.proxy import podip
    before = podip.EXHAUSTED.value
    pods, _ = pod_networks(cluster(), monkeypatch, cidr="10.99.0.0/30")  # 2 addresses
    with caplog.at_level("WARNING"):
        pods.sync()
    assert "is full" in caplog.text
    assert pods.plan.allocator.exhausted >= 2
    assert podip.EXHAUSTED.value >= before + 2


def test_status_shows_the_edge_cni() -> None:
    from edgemesh.status import render
    store = cluster()
    plan = plan_for(store)
    text = render({"node": {"node": "a1", "synced": True},
                   "edgeCNI": {**plan.view(limit=1), "podNetworks": ["10.244.2.0/24"]}})
    assert "mode auto, meshCIDR 100.127.0.0/16" in text
    assert "\n10.244.2.0/24 " in text and "... and" in text
