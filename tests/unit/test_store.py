"""The store: indexes, backends of a service port, DestinationRule lookup, subscriptions."""
from __future__ import annotations

import logging
from typing import Any

from edgemesh.meta import istio, models
from edgemesh.meta.store import Store


def svc(name="web", ns="demo", ips=("10.96.0.10",), ports=None, publish=False,
        external_ips=()) -> tuple[Any, dict]:
    raw = {"metadata": {"name": name, "namespace": ns}, "spec": {
        "clusterIPs": list(ips), "externalIPs": list(external_ips),
        "publishNotReadyAddresses": publish,
        "ports": ports or [{"name": "http", "port": 80, "targetPort": 8080}]}}
    return models.parse_service(raw), raw


def eps(name, service="web", ns="demo", endpoints=(), ports=None, family="IPv4"):
    raw = {"metadata": {"name": name, "namespace": ns,
                        "labels": {models.SERVICE_NAME_LABEL: service} if service else {}},
           "addressType": family, "endpoints": list(endpoints),
           "ports": [{"name": "http", "port": 8080}] if ports is None else ports}
    return models.parse_endpoint_slice(raw), raw


def ep(ip, node="", ready=None, serving=None, terminating=None, hostname=""):
    cond = {k: v for k, v in (("ready", ready), ("serving", serving),
                              ("terminating", terminating)) if v is not None}
    return {"addresses": [ip], "nodeName": node, "conditions": cond, "hostname": hostname}


def legacy(name="web", ns="demo", subsets=()):
    raw = {"metadata": {"name": name, "namespace": ns}, "subsets": list(subsets)}
    return models.parse_endpoints(raw), raw


def dr(name, host, ns="demo", simple="RANDOM"):
    raw = {"metadata": {"name": name, "namespace": ns},
           "spec": {"host": host, "trafficPolicy": {"loadBalancer": {"simple": simple}}}}
    return istio.parse_destination_rule(raw), raw


def backends(store, service=None, port=0, **kw):
    service = service or store.service("demo", "web")
    return [(b.ip, b.port, b.node_name, b.ready)
            for b in store.backends(service, service.ports[port], **kw)]


# ---- basic reads and indexes ------------------------------------------------------------------

def test_service_indexes_by_name_and_ip():
    store = Store()
    store.replace("Service", [svc("web", ips=("10.96.0.10", "fd00::10")),
                              svc("db", ns="other", ips=("None",)),
                              svc("ext", ips=(), external_ips=("192.0.2.7",))])
    assert store.service("demo", "web").meta.name == "web"
    assert store.service("other", "web") is None
    assert store.service_by_ip("10.96.0.10").meta.name == "web"
    assert store.service_by_ip("fd00::10").meta.name == "web"
    assert store.service_by_ip("192.0.2.7").meta.name == "ext"
    assert store.service_by_ip("None") is None and store.service_by_ip("10.96.0.99") is None
    assert store.count("Service") == 3 and len(store.services()) == 3
    assert {s.meta.name for s in store.list("Service")} == {"web", "db", "ext"}


def test_index_invalidated_by_changes_to_its_kind_only():
    store = Store()
    store.replace("Service", [svc("web", ips=("10.96.0.10",))])
    assert store.service_by_ip("10.96.0.10")
    store.upsert("Service", *svc("web", ips=("10.96.0.11",)))
    assert store.service_by_ip("10.96.0.10") is None
    assert store.service_by_ip("10.96.0.11").meta.name == "web"
    store.delete("Service", "demo", "web")
    assert store.service_by_ip("10.96.0.11") is None
    store.replace("Service", [svc("a", ips=("10.96.0.1",))])
    store.replace("EndpointSlice", [eps("a-1", service="a", endpoints=[ep("172.17.0.1")])])
    a = store.service("demo", "a")
    assert backends(store, a) == [("172.17.0.1", 8080, "", True)]
    store.replace("EndpointSlice", [eps("a-1", service="a", endpoints=[ep("172.17.0.2")])])
    assert backends(store, a) == [("172.17.0.2", 8080, "", True)]


def test_namespaces_index():
    store = Store()
    store.replace("Namespace", [(models.parse_namespace({"metadata": {"name": "empty"}}), {})])
    store.replace("Service", [svc("web", ns="apps")])
    assert {"empty", "apps"} <= store.namespaces() and "nope" not in store.namespaces()
    store.replace("Service", [])
    assert "apps" not in store.namespaces()


def test_writes_report_whether_anything_changed_and_keep_raw_documents():
    store = Store(keep_raw=True)
    obj, raw = svc()
    assert store.replace("Service", [(obj, raw)])
    assert not store.replace("Service", [svc()])
    assert not store.upsert("Service", *svc())
    assert store.upsert("Service", *svc(ips=("10.96.0.11",)))
    assert store.raw_snapshot() == {"Service": [svc(ips=("10.96.0.11",))[1]]}
    assert store.delete("Service", "demo", "web")
    assert not store.delete("Service", "demo", "web")
    assert store.raw_snapshot() == {}
    assert store.get("Service", "demo", "web") is None


# ---- backends ---------------------------------------------------------------------------------

def test_backends_merge_and_dedupe_across_slices():
    store = Store()
    store.replace("Service", [svc()])
    store.replace("EndpointSlice", [
        eps("web-a", endpoints=[ep("172.17.1.1", "n1"), ep("172.17.1.2", "n1", ready=False)]),
        eps("web-b", endpoints=[ep("172.17.1.2", "n1"), ep("172.17.2.1", "n2")]),
        eps("web-c", endpoints=[ep("172.17.2.1", "n2", ready=False)]),  # stale duplicate
        eps("other", service="db", endpoints=[ep("172.17.9.9")]),
        eps("orphan", service="", endpoints=[ep("172.17.9.8")])])
    assert backends(store) == [("172.17.1.1", 8080, "n1", True), ("172.17.1.2", 8080, "n1", True),
                               ("172.17.2.1", 8080, "n2", True)]
    assert [s.meta.name for s in store.slices_for(store.service("demo", "web"))] == \
        ["web-a", "web-b", "web-c"]


def test_the_same_pod_ip_on_two_nodes_is_two_backends():
    # edge sites reuse Pod ranges (every Docker host has 172.17.0.0/16): merging these by
    # address hid one node's endpoint, and a retry after the other failed had nowhere to go
    store = Store()
    store.replace("Service", [svc()])
    store.replace("EndpointSlice", [
        eps("web-a", endpoints=[ep("172.17.0.2", "b1"), ep("172.17.0.2", "b2")]),
        eps("web-b", endpoints=[ep("172.17.0.2", "b2")])])  # the same endpoint twice: merged
    assert backends(store) == [("172.17.0.2", 8080, "b1", True), ("172.17.0.2", 8080, "b2", True)]


def test_backends_match_ports_by_name_and_protocol():
    store = Store()
    store.replace("Service", [svc(ports=[
        {"name": "http", "port": 80, "targetPort": "web"},
        {"name": "dns", "port": 53, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP"}])])
    store.replace("EndpointSlice", [eps("web-a", endpoints=[ep("172.17.1.1")], ports=[
        {"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 5353, "protocol": "UDP"}])])
    web = store.service("demo", "web")
    assert backends(store, web, 0) == [("172.17.1.1", 8080, "", True)]
    assert backends(store, web, 1) == [("172.17.1.1", 5353, "", True)]
    assert backends(store, web, 2) == []  # the slice has no TCP port of that name


def test_not_ready_and_include_not_ready():
    store = Store()
    store.replace("Service", [svc()])
    store.replace("EndpointSlice", [eps("web-a", endpoints=[
        ep("172.17.1.1", ready=True), ep("172.17.1.2", ready=False, serving=False)])])
    assert backends(store) == [("172.17.1.1", 8080, "", True)]
    assert backends(store, include_not_ready=True) == [("172.17.1.1", 8080, "", True),
                                                       ("172.17.1.2", 8080, "", False)]


def test_terminating_fallback_only_when_nothing_is_ready():
    store = Store()
    store.replace("Service", [svc()])
    leaving = ep("172.17.1.1", ready=False, serving=True, terminating=True)
    gone = ep("172.17.1.2", ready=False, serving=False, terminating=True)
    store.replace("EndpointSlice", [eps("web-a", endpoints=[leaving, gone])])
    assert backends(store) == [("172.17.1.1", 8080, "", False)]
    store.replace("EndpointSlice", [eps("web-a", endpoints=[leaving, gone, ep("172.17.1.3")])])
    assert backends(store) == [("172.17.1.3", 8080, "", True)]


def test_publish_not_ready_addresses_makes_every_endpoint_ready():
    store = Store()
    store.replace("Service", [svc(publish=True)])
    store.replace("EndpointSlice", [eps("web-a", endpoints=[ep("172.17.1.2", ready=False)])])
    assert backends(store) == [("172.17.1.2", 8080, "", True)]


def test_endpoints_fallback_only_without_slices():
    store = Store()
    store.replace("Service", [svc()])
    store.replace("Endpoints", [legacy(subsets=[
        {"addresses": [{"ip": "172.17.1.1", "nodeName": "n1"}],
         "notReadyAddresses": [{"ip": "172.17.1.9"}],
         "ports": [{"name": "http", "port": 8080}]},
        {"addresses": [{"ip": "172.17.2.1", "nodeName": "n2"}],
         "ports": [{"name": "http", "port": 9090}]}])])
    assert backends(store) == [("172.17.1.1", 8080, "n1", True), ("172.17.2.1", 9090, "n2", True)]
    assert backends(store, include_not_ready=True)[1] == ("172.17.1.9", 8080, "", False)
    store.replace("EndpointSlice", [eps("web-a", endpoints=[ep("172.17.3.1")])])
    assert backends(store) == [("172.17.3.1", 8080, "", True)]


def test_portless_endpoints_use_a_numeric_target_port():
    store = Store()
    store.replace("Service", [svc(ports=[{"name": "a", "port": 80, "targetPort": 8081},
                                         {"name": "b", "port": 81, "targetPort": "named"}])])
    store.replace("Endpoints", [legacy(subsets=[{"addresses": [{"ip": "172.17.1.1"}]}])])
    assert backends(store, port=0) == [("172.17.1.1", 8081, "", True)]
    assert backends(store, port=1) == []


def test_backend_carries_endpoint_details():
    store = Store()
    store.replace("Service", [svc()])
    store.replace("EndpointSlice", [eps("web-a", endpoints=[{
        "addresses": ["172.17.1.1", "172.17.1.2"], "nodeName": "n1", "hostname": "web-0",
        "zone": "z", "targetRef": {"kind": "Pod", "namespace": "demo", "name": "web-0"}}])])
    b1, b2 = store.backends(store.service("demo", "web"), store.service("demo", "web").ports[0])
    assert (b1.ip, b2.ip) == ("172.17.1.1", "172.17.1.2")
    assert (b1.hostname, b1.zone, b1.target_ref.name, b1.serving, b1.terminating) == \
        ("web-0", "z", "web-0", True, False)


# ---- DestinationRules -------------------------------------------------------------------------

def rule_for(store, name="web", ns="demo"):
    found = store.destination_rule_for(store.service(ns, name))
    return found.meta.name if found else None


def test_destination_rule_host_forms():
    store = Store()
    store.replace("Service", [svc("web"), svc("web", ns="other"), svc("db")])
    for host, matches in [("web", {("demo", "web")}),
                          ("web.other", {("other", "web")}),
                          ("web.other.svc", {("other", "web")}),
                          ("web.other.svc.cluster.local", {("other", "web")}),
                          ("web.other.svc.cluster.local.", {("other", "web")}),
                          ("WEB.demo.svc.cluster.local", {("demo", "web")}),
                          ("*.other.svc.cluster.local", {("other", "web")}),
                          ("*.svc.cluster.local", {("demo", "web"), ("other", "web"),
                                                   ("demo", "db")}),
                          ("*.local", {("demo", "web"), ("other", "web"), ("demo", "db")}),
                          ("*", {("demo", "web"), ("other", "web"), ("demo", "db")}),
                          ("web.other.svc.example.org", set()),
                          ("db.demo.svc.cluster", set())]:
        store.replace("DestinationRule", [dr("r", host, ns="demo")])
        found = {s.key for s in store.services() if store.destination_rule_for(s)}
        assert found == matches, host


def test_destination_rule_short_host_is_relative_to_the_rules_namespace():
    store = Store()
    store.replace("Service", [svc("web"), svc("web", ns="other")])
    store.replace("DestinationRule", [dr("r", "web", ns="other")])
    assert rule_for(store, ns="other") == "r" and rule_for(store, ns="demo") is None


def test_destination_rule_precedence():
    store = Store()
    store.replace("Service", [svc("web")])
    store.replace("DestinationRule", [dr("elsewhere", "web.demo", ns="zz"),
                                      dr("wild", "*.demo.svc.cluster.local", ns="demo")])
    assert rule_for(store) == "wild"  # same namespace first
    store.upsert("DestinationRule", *dr("exact", "web", ns="demo"))
    assert rule_for(store) == "exact"  # exact host before a wildcard
    store.replace("DestinationRule", [dr("any", "*", ns="demo"),
                                      dr("narrow", "*.demo.svc.cluster.local", ns="demo")])
    assert rule_for(store) == "narrow"  # the longer wildcard
    store.replace("DestinationRule", [dr("b", "web"), dr("a", "web.demo.svc.cluster.local")])
    assert rule_for(store) == "a"  # stable tie-break by name


def test_destination_rule_custom_zone():
    store = Store()
    store.replace("Service", [svc("web")])
    store.replace("DestinationRule", [dr("r", "web.demo.svc.edge.local")])
    web = store.service("demo", "web")
    assert store.destination_rule_for(web) is None
    assert store.destination_rule_for(web, zone="edge.local").meta.name == "r"
    store.replace("DestinationRule", [dr("r", "web")])
    assert store.destination_rule_for(web, zone="edge.local").meta.name == "r"


def test_destination_rule_by_the_services_name_as_the_go_edgemesh(caplog):
    """Go's hostname-lb-random.yaml: rule named after the Service, host the Deployment's."""
    store = Store()
    store.replace("Service", [svc("hostname-lb-svc"), svc("web"),
                              svc("hostname-lb-svc", ns="other")])
    store.replace("DestinationRule", [dr("hostname-lb-svc", "hostname-lb-edge")])
    service = store.service("demo", "hostname-lb-svc")
    with caplog.at_level(logging.INFO, "edgemesh.meta.store"):
        for _ in range(3):
            match = store.destination_rule_match(service)
            assert (match.rule.meta.name, match.by) == ("hostname-lb-svc", "name")
    assert [r.getMessage() for r in caplog.records if "by its name" in r.getMessage()] == [
        "DestinationRule demo/hostname-lb-svc applies to Service demo/hostname-lb-svc by its "
        "name, as the Go EdgeMesh matched rules (its host 'hostname-lb-edge' names no Service;"
        " set host: hostname-lb-svc to match it the Istio way)"]
    assert rule_for(store, "web") is None  # a name matches its own service only
    assert rule_for(store, "hostname-lb-svc", ns="other") is None


def test_destination_rule_host_match_wins_over_the_name():
    store = Store()
    store.replace("Service", [svc("web"), svc("api")])
    store.replace("DestinationRule", [dr("web", "nothing-here", simple="ROUND_ROBIN"),
                                      dr("by-host", "web")])
    match = store.destination_rule_match(store.service("demo", "web"))
    assert (match.rule.meta.name, match.by) == ("by-host", "host")
    # a rule whose host names another Service is that Service's rule, not also its namesake's
    store.replace("DestinationRule", [dr("web", "api")])
    assert rule_for(store, "web") is None and rule_for(store, "api") == "web"
    store.delete("Service", "demo", "api")  # now its host names nothing: Go's reading applies
    assert store.destination_rule_match(store.service("demo", "web")).by == "name"


# ---- subscriptions ----------------------------------------------------------------------------

def test_subscriptions_filtered_by_kind_and_sync_state():
    store = Store()
    everything: list[frozenset[str]] = []
    services: list[frozenset[str]] = []
    store.subscribe(everything.append)
    store.subscribe(services.append, ["Service"])
    store.replace_many({"Service": [svc()], "Pod": [], "Node": []})
    assert everything == [frozenset({"Service"})] and services == [frozenset({"Service"})]
    store.replace("EndpointSlice", [eps("web-a", endpoints=[ep("172.17.1.1")])])
    assert everything[-1] == frozenset({"EndpointSlice"}) and len(services) == 1
    store.replace("EndpointSlice", [eps("web-a", endpoints=[ep("172.17.1.1")])])  # no change
    assert len(everything) == 2
    revision = store.revision
    store.mark_synced()
    assert store.synced and everything[-1] == frozenset() and services[-1] == frozenset()
    assert store.revision == revision + 1
    store.mark_synced()  # no change: nobody is woken
    assert len(everything) == 3
    store.mark_synced("API unreachable")
    assert store.stale_reason == "API unreachable" and len(everything) == 4


def test_a_failing_listener_does_not_stop_others_and_unsubscribe():
    store = Store()
    seen: list[frozenset[str]] = []

    def broken(_: frozenset[str]) -> None:
        raise RuntimeError("consumer bug")

    store.subscribe(broken)
    store.subscribe(seen.append)
    store.replace("Service", [svc()])
    assert seen == [frozenset({"Service"})]
    store.unsubscribe(seen.append)
    store.delete("Service", "demo", "web")
    assert len(seen) == 1


def test_nodes_and_pods():
    store = Store()
    node = models.parse_node({"metadata": {"name": "edge-1"}, "status": {
        "addresses": [{"type": "InternalIP", "address": "192.168.1.2"}]}})
    store.replace("Node", [(node, {})])
    store.replace("Pod", [(models.parse_pod({"metadata": {"name": "p"}}), {})])
    assert store.node("edge-1").addresses == (("InternalIP", "192.168.1.2"),)
    assert store.node("edge-2") is None and [p.meta.name for p in store.pods()] == ["p"]


def test_slices_of_a_service_from_one_to_several_and_back():
    """The slice index holds a Service's only slice, or a map once it has several."""
    store = Store()
    store.replace("Service", [svc()])
    web = store.service("demo", "web")
    names = lambda: [s.meta.name for s in store.slices_for(web)]  # noqa: E731
    store.upsert("EndpointSlice", *eps("web-b", endpoints=[ep("172.17.1.2")]))
    store.upsert("EndpointSlice", *eps("web-b", endpoints=[ep("172.17.1.3")]))  # replaced
    assert names() == ["web-b"] and [b[0] for b in backends(store)] == ["172.17.1.3"]
    store.upsert("EndpointSlice", *eps("web-a", endpoints=[ep("172.17.1.1")]))
    assert names() == ["web-a", "web-b"]
    store.delete("EndpointSlice", "demo", "web-b")
    assert names() == ["web-a"]
    store.delete("EndpointSlice", "demo", "web-a")
    assert names() == [] and backends(store) == []
