"""Model parsers: lenient where the API is (null/absent), strict where a wrong type misleads."""
from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemesh.errors import ManifestError
from edgemesh.meta import istio, kinds, models
from edgemesh.meta.models import AppProtocol, app_protocol_of


def meta(name="x", ns="demo", **extra):
    return {"metadata": {"name": name, "namespace": ns, **extra}}


def raises(parse, doc, field: str) -> str:
    with pytest.raises(ManifestError) as e:
        parse(doc)
    assert str(e.value).startswith(field), str(e.value)
    return str(e.value)


# ---- metadata ---------------------------------------------------------------------------------

def test_meta_defaults_and_cluster_scoped_kinds():
    m = models.parse_meta({"metadata": {"name": "a", "labels": None, "annotations": None}})
    assert (m.name, m.namespace, m.labels, m.annotations) == ("a", "default", {}, {})
    m = models.parse_meta({"metadata": {"name": "a", "namespace": "x", "uid": "u",
                                        "resourceVersion": "7", "labels": {"v": 1, "b": True}}})
    assert (m.namespace, m.uid, m.resource_version, m.labels) == ("x", "u", "7",
                                                                  {"v": "1", "b": "true"})
    assert models.parse_namespace({"metadata": {"name": "n", "namespace": "ignored"}}
                                  ).meta.namespace == ""


@pytest.mark.parametrize("doc, field", [
    ({}, "metadata.name: required"),
    ({"metadata": None}, "metadata.name: required"),
    ({"metadata": []}, "metadata: expected a mapping"),
    ({"metadata": {"name": 5}}, "metadata.name: expected a string"),
    ({"metadata": {"name": "a", "namespace": 1}}, "metadata.namespace: expected a string"),
    ({"metadata": {"name": "a", "labels": []}}, "metadata.labels: expected a mapping"),
    ({"metadata": {"name": "a", "labels": {"k": None}}}, "metadata.labels.k: expected a string"),
    ({"metadata": {"name": "a", "annotations": {"k": {}}}},
     "metadata.annotations.k: expected a string"),
])
def test_meta_bad_shapes(doc, field):
    raises(models.parse_meta, doc, field)


def test_meta_of_a_non_mapping():
    raises(models.parse_meta, ["a"], "object: expected a mapping")


# ---- Service ----------------------------------------------------------------------------------

def test_service_full():
    svc = models.parse_service({**meta("web"), "spec": {
        "type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::a"],
        "selector": {"app": "web"}, "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
        "publishNotReadyAddresses": True, "externalIPs": ["192.0.2.1"],
        "ports": [{"name": "http", "port": 80, "targetPort": "web", "appProtocol": "http"},
                  {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353,
                   "nodePort": 30053}]}})
    assert svc.key == ("demo", "web") and not svc.headless
    assert svc.cluster_ips == ("10.96.0.10", "fd00::a")
    assert svc.selector == {"app": "web"}
    assert (svc.session_affinity, svc.affinity_timeout) == ("ClientIP", 60)
    assert svc.publish_not_ready and svc.external_ips == ("192.0.2.1",)
    http, dns = svc.ports
    assert (http.target_port, http.protocol, http.app) == ("web", "TCP", AppProtocol.HTTP)
    assert (dns.target_port, dns.protocol, dns.node_port, dns.app) == (5353, "UDP", 30053,
                                                                        AppProtocol.UDP)
    assert svc.port_named("dns") is dns and svc.port_named("nope") is None


def test_service_absent_and_null_fields():
    svc = models.parse_service({**meta("bare"), "spec": None})
    assert (svc.type, svc.cluster_ips, svc.ports, svc.selector) == ("ClusterIP", (), (), None)
    assert (svc.session_affinity, svc.affinity_timeout, svc.publish_not_ready) == \
        ("None", 10800, False)
    assert svc.headless  # no cluster IP at all: nothing to proxy
    svc = models.parse_service({**meta("n"), "spec": {
        "clusterIP": "None", "clusterIPs": None, "ports": None, "selector": {},
        "externalIPs": None, "sessionAffinityConfig": None,
        "ports_": None} | {"ports": [{"port": 80, "targetPort": None}]}})
    assert svc.headless and svc.cluster_ips == ("None",) and svc.selector is None
    assert svc.ports[0].target_port == 80 and svc.ports[0].name == ""


@pytest.mark.parametrize("target", [0, "", None])
def test_service_target_port_defaults_to_port(target):
    svc = models.parse_service({**meta(), "spec": {"ports": [{"port": 81,
                                                                "targetPort": target}]}})
    assert svc.ports[0].target_port == 81


def test_external_name_service():
    svc = models.parse_service({**meta("docs"), "spec": {"type": "ExternalName",
                                                         "externalName": "kubernetes.io."}})
    assert svc.external_name == "kubernetes.io" and not svc.headless


@pytest.mark.parametrize("spec, field", [
    ([], "spec: expected a mapping"),
    ({"ports": {}}, "spec.ports: expected a list"),
    ({"ports": [5]}, "spec.ports[0]: expected a mapping"),
    ({"ports": [{"port": "abc"}]}, "spec.ports[0].port: expected an integer, got 'abc'"),
    ({"ports": [{}]}, "spec.ports[0].port: expected an integer 1-65535, got None"),
    ({"ports": [{"port": 70000}]}, "spec.ports[0].port: expected an integer 1-65535"),
    ({"ports": [{"port": True}]}, "spec.ports[0].port: expected an integer"),
    ({"ports": [{"port": 1, "protocol": "ICMP"}]}, "spec.ports[0].protocol: expected TCP"),
    ({"ports": [{"port": 1, "targetPort": 1.5}]}, "spec.ports[0].targetPort: expected"),
    ({"ports": [{"port": 1, "nodePort": "x"}]}, "spec.ports[0].nodePort: expected an integer"),
    ({"ports": [{"port": 1, "name": 3}]}, "spec.ports[0].name: expected a string"),
    ({"selector": ["app"]}, "spec.selector: expected a mapping"),
    ({"clusterIPs": "10.0.0.1"}, "spec.clusterIPs: expected a list"),
    ({"clusterIPs": [1]}, "spec.clusterIPs: expected a list of strings"),
    ({"type": "ExternalName"}, "spec.externalName: required for type ExternalName"),
    ({"publishNotReadyAddresses": "yes"}, "spec.publishNotReadyAddresses: expected true"),
    ({"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": "1h"}}},
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds: expected an integer"),
])
def test_service_bad_shapes(spec, field):
    raises(models.parse_service, {**meta(), "spec": spec}, field)


def test_service_load_balancer_ingress():
    svc = models.parse_service({**meta("lb"), "spec": {"type": "LoadBalancer"}, "status": {
        "loadBalancer": {"ingress": [{"ip": "203.0.113.7"},
                                     {"ip": "203.0.113.8", "ipMode": "Proxy"},
                                     {"hostname": "lb.example.com"}]}}})
    assert svc.load_balancer_ingress == (
        models.LoadBalancerIngress(ip="203.0.113.7"),
        models.LoadBalancerIngress(ip="203.0.113.8", ip_mode="Proxy"),
        models.LoadBalancerIngress(hostname="lb.example.com"))
    for status in (None, {}, {"loadBalancer": None}, {"loadBalancer": {"ingress": None}}):
        svc = models.parse_service({**meta("lb"), "spec": {}, "status": status})
        assert svc.load_balancer_ingress == ()


@pytest.mark.parametrize("status, field", [
    ([], "status: expected a mapping"),
    ({"loadBalancer": []}, "status.loadBalancer: expected a mapping"),
    ({"loadBalancer": {"ingress": {}}}, "status.loadBalancer.ingress: expected a list"),
    ({"loadBalancer": {"ingress": ["1.2.3.4"]}},
     "status.loadBalancer.ingress[0]: expected a mapping"),
    ({"loadBalancer": {"ingress": [{"ip": 7}]}},
     "status.loadBalancer.ingress[0].ip: expected a string, got 7"),
    ({"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}, {"ip": "lb.example"}]}},
     "status.loadBalancer.ingress[1].ip: expected an IP address, got 'lb.example'"),
    ({"loadBalancer": {"ingress": [{"ipMode": False}]}},
     "status.loadBalancer.ingress[0].ipMode: expected a string"),
])
def test_service_load_balancer_bad_shapes(status, field):
    raises(models.parse_service, {**meta(), "spec": {}, "status": status}, field)


@pytest.mark.parametrize("app_protocol, name, protocol, expected", [
    ("", "http", "TCP", AppProtocol.HTTP),
    ("", "http-0", "TCP", AppProtocol.HTTP),
    ("", "HTTP-web", "TCP", AppProtocol.HTTP),
    ("", "https", "TCP", AppProtocol.HTTPS),
    ("", "https-admin", "TCP", AppProtocol.HTTPS),
    ("", "tcp", "TCP", AppProtocol.TCP),
    ("", "tcp-echo", "TCP", AppProtocol.TCP),
    ("", "udp", "UDP", AppProtocol.UDP),
    ("", "ws", "TCP", AppProtocol.WS),
    ("", "ws-chat", "TCP", AppProtocol.WS),
    ("", "grpc", "TCP", AppProtocol.GRPC),
    ("", "grpc-api", "TCP", AppProtocol.GRPC),
    ("", "grpc-web", "TCP", AppProtocol.HTTP),
    ("", "http2", "TCP", AppProtocol.HTTP2),
    ("", "web", "TCP", AppProtocol.TCP),
    ("", "httpx", "TCP", AppProtocol.TCP),
    ("", "", "TCP", AppProtocol.TCP),
    ("", "", "SCTP", AppProtocol.SCTP),
    # appProtocol wins over the name, and may be a kubernetes.io/ name
    ("http", "tcp-x", "TCP", AppProtocol.HTTP),
    ("https", "http", "TCP", AppProtocol.HTTPS),
    ("kubernetes.io/h2c", "http", "TCP", AppProtocol.HTTP2),
    ("kubernetes.io/ws", "", "TCP", AppProtocol.WS),
    ("kubernetes.io/wss", "", "TCP", AppProtocol.HTTPS),
    ("mysql", "http", "TCP", AppProtocol.HTTP),  # unknown appProtocol: the name decides
    # the protocol field decides when names would contradict it
    ("", "http", "UDP", AppProtocol.UDP),
    ("http", "", "UDP", AppProtocol.UDP),
    ("", "http", "SCTP", AppProtocol.SCTP),
    ("", "udp-x", "TCP", AppProtocol.TCP),
])
def test_app_protocol_rules(app_protocol, name, protocol, expected):
    assert app_protocol_of(app_protocol, name, protocol) is expected


# ---- EndpointSlice ----------------------------------------------------------------------------

def slice_doc(**extra):
    return {**meta("web-abc", labels={models.SERVICE_NAME_LABEL: "web"}), **extra}


def test_endpoint_slice_full():
    sl = models.parse_endpoint_slice(slice_doc(addressType="IPv6", endpoints=[{
        "addresses": ["fd00::1"], "conditions": {"ready": False, "serving": True,
                                                 "terminating": True},
        "hostname": "web-0", "nodeName": "edge-1", "zone": "z1",
        "targetRef": {"kind": "Pod", "namespace": "demo", "name": "web-0", "uid": "u"},
        "hints": {"forZones": [{"name": "z1"}]}}],
        ports=[{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}]))
    assert (sl.service_name, sl.address_type) == ("web", "IPv6")
    [ep] = sl.endpoints
    assert (ep.addresses, ep.ready, ep.serving, ep.terminating) == (("fd00::1",), False, True,
                                                                    True)
    assert (ep.hostname, ep.node_name, ep.zone) == ("web-0", "edge-1", "z1")
    assert ep.target_ref == models.TargetRef("Pod", "demo", "web-0") and ep.ports is None
    assert sl.ports == (models.EndpointPort("http", 8080, "TCP", "http"),)


def test_endpoint_slice_null_slices_and_condition_defaults():
    sl = models.parse_endpoint_slice(slice_doc(endpoints=None, ports=None))
    assert (sl.endpoints, sl.ports, sl.address_type) == ((), (), "IPv4")
    sl = models.parse_endpoint_slice(slice_doc(endpoints=[
        {"addresses": ["172.17.0.1"]}, {"addresses": ["172.17.0.2"], "conditions": None},
        {"addresses": ["172.17.0.3"], "conditions": {"ready": None, "serving": None}}],
        ports=[{"port": None}]))
    for ep in sl.endpoints:
        assert (ep.ready, ep.serving, ep.terminating, ep.target_ref) == (True, True, False, None)
    assert sl.ports == (models.EndpointPort("", None, "TCP", ""),)
    unlabeled = models.parse_endpoint_slice(meta("custom"))
    assert unlabeled.service_name == ""  # a custom controller's slice belongs to no service


@pytest.mark.parametrize("extra, field", [
    ({"endpoints": {}}, "endpoints: expected a list"),
    ({"endpoints": ["1.2.3.4"]}, "endpoints[0]: expected a mapping"),
    ({"endpoints": [{"addresses": "1.2.3.4"}]}, "endpoints[0].addresses: expected a list"),
    ({"endpoints": [{"addresses": [], "conditions": {"ready": "yes"}}]},
     "endpoints[0].conditions.ready: expected true or false"),
    ({"endpoints": [{"addresses": [], "nodeName": 1}]}, "endpoints[0].nodeName: expected"),
    ({"ports": [{"port": "http"}]}, "ports[0].port: expected an integer"),
    ({"ports": [{"name": 5}]}, "ports[0].name: expected a string"),
    ({"ports": ["http"]}, "ports[0]: expected a mapping"),
    ({"addressType": 4}, "addressType: expected a string"),
])
def test_endpoint_slice_bad_shapes(extra, field):
    raises(models.parse_endpoint_slice, slice_doc(**extra), field)


# ---- Endpoints --------------------------------------------------------------------------------

def test_endpoints_conversion():
    sl = models.parse_endpoints({**meta("web"), "subsets": [
        {"addresses": [{"ip": "172.17.0.1", "nodeName": "n1", "hostname": "h1",
                        "targetRef": {"kind": "Pod", "name": "p1", "namespace": "demo"}}],
         "notReadyAddresses": [{"ip": "172.17.0.2"}],
         "ports": [{"name": "http", "port": 8080}]},
        {"addresses": [{"ip": "172.17.0.3"}], "ports": [{"name": "http", "port": 9090}]}]})
    assert sl.service_name == "web" and sl.address_type == "IPv4"
    a, b, c = sl.endpoints
    assert (a.addresses, a.ready, a.serving, a.node_name, a.hostname) == \
        (("172.17.0.1",), True, True, "n1", "h1")
    assert a.target_ref.name == "p1"
    assert (b.ready, b.serving) == (False, False)
    # each subset keeps its own ports: a named target port resolved differently per subset
    assert [e.ports[0].port for e in (a, b, c)] == [8080, 8080, 9090]
    assert [p.port for p in sl.ports] == [8080, 9090]


def test_endpoints_absent_subsets_and_ipv6():
    assert models.parse_endpoints(meta("web")).endpoints == ()
    assert models.parse_endpoints({**meta("web"), "subsets": None}).endpoints == ()
    sl = models.parse_endpoints({**meta("web"), "subsets": [{"addresses": [{"ip": "fd00::1"}],
                                                             "ports": None}]})
    assert sl.address_type == "IPv6" and sl.endpoints[0].ports == ()


@pytest.mark.parametrize("subsets, field", [
    ({}, "subsets: expected a list"),
    ([1], "subsets[0]: expected a mapping"),
    ([{"addresses": [{}]}], "subsets[0].addresses[0].ip: required"),
    ([{"notReadyAddresses": ["1.2.3.4"]}], "subsets[0].notReadyAddresses[0].ip: required"),
    ([{"addresses": [{"ip": 5}]}], "subsets[0].addresses[0].ip: expected a string"),
    ([{"ports": [{"port": "x"}]}], "subsets[0].ports[0].port: expected an integer"),
    ([{"ports": [7]}], "subsets[0].ports[0]: expected a mapping"),
])
def test_endpoints_bad_shapes(subsets, field):
    raises(models.parse_endpoints, {**meta("web"), "subsets": subsets}, field)


# ---- Pod, Node, Namespace, Secret -------------------------------------------------------------

def test_pod_full_and_ready_rules():
    pod = models.parse_pod({**meta("web-0", labels={"app": "web"},
                                   deletionTimestamp="2024-01-01T00:00:00Z"),
                            "spec": {"nodeName": "n1", "hostname": "web-0", "subdomain": "web",
                                     "hostNetwork": False, "containers": [
                                         {"name": "c", "ports": [
                                             {"name": "http", "containerPort": 8080},
                                             {"containerPort": 53, "protocol": "UDP"}]},
                                         {"name": "sidecar", "ports": None}]},
                            "status": {"phase": "Running", "podIP": "172.17.0.1",
                                       "podIPs": [{"ip": "172.17.0.1"}, {"ip": "fd00::1"}],
                                       "conditions": [{"type": "Initialized",
                                                       "status": "True"},
                                                      {"type": "Ready", "status": "True"}]}})
    assert (pod.node_name, pod.hostname, pod.subdomain, pod.phase) == ("n1", "web-0", "web",
                                                                       "Running")
    assert pod.pod_ips == ("172.17.0.1", "fd00::1") and pod.ready and pod.terminating
    assert pod.container_ports == (("http", 8080, "TCP"), ("", 53, "UDP"))


def test_pod_absent_fields():
    pod = models.parse_pod(meta("p"))
    assert (pod.pod_ips, pod.ready, pod.terminating, pod.phase, pod.container_ports) == \
        ((), False, False, "", ())
    pod = models.parse_pod({**meta("p"), "spec": {"containers": None},
                            "status": {"podIP": "172.17.0.9", "podIPs": None,
                                       "conditions": [{"type": "Ready", "status": "False"}]}})
    assert pod.pod_ips == ("172.17.0.9",) and not pod.ready


@pytest.mark.parametrize("doc, field", [
    ({"spec": {"nodeName": 1}}, "spec.nodeName: expected a string"),
    ({"spec": {"hostNetwork": "true"}}, "spec.hostNetwork: expected true or false"),
    ({"status": {"conditions": {}}}, "status.conditions: expected a list"),
    ({"status": {"podIPs": [{"ip": 5}]}}, "status.podIPs[0].ip: expected a string"),
    ({"spec": {"containers": [{"ports": [{"containerPort": "80"}]}]}},
     "spec.containers[0].ports[0].containerPort: expected an integer"),
])
def test_pod_bad_shapes(doc, field):
    raises(models.parse_pod, {**meta("p"), **doc}, field)


def test_node_namespace_secret():
    node = models.parse_node({"metadata": {"name": "edge-1"}, "status": {"addresses": [
        {"type": "InternalIP", "address": "192.168.1.10"}, {"type": "Hostname",
                                                             "address": "edge-1"}]}})
    assert node.meta.namespace == "" and node.addresses == (("InternalIP", "192.168.1.10"),
                                                            ("Hostname", "edge-1"))
    assert models.parse_node({"metadata": {"name": "n"}, "status": {"addresses": None}}
                             ).addresses == ()
    raises(models.parse_node, {"metadata": {"name": "n"},
                               "status": {"addresses": [{"address": 1}]}},
           "status.addresses[0].address: expected a string")
    ns = models.parse_namespace({"metadata": {"name": "x"}})
    assert ns.phase == "Active"
    assert models.parse_namespace({"metadata": {"name": "x"}, "status": {"phase": "Terminating"}}
                                  ).phase == "Terminating"
    secret = models.parse_secret({**meta("tls"), "type": "kubernetes.io/tls",
                                  "data": {"tls.crt": base64.b64encode(b"CERT").decode(),
                                           "empty": None},
                                  "stringData": {"note": "hi"}})
    assert secret.type == "kubernetes.io/tls"
    assert secret.data == {"tls.crt": b"CERT", "empty": b"", "note": b"hi"}
    assert models.parse_secret(meta("s")).data == {} and models.parse_secret(meta("s")).type == \
        "Opaque"
    raises(models.parse_secret, {**meta("s"), "data": {"k": "not base64!"}},
           "data.k: not valid base64")


# ---- Istio ------------------------------------------------------------------------------------

def istio_doc(kind, version, spec):
    return {"apiVersion": f"networking.istio.io/{version}", "kind": kind, **meta("r"),
            "spec": spec}


@pytest.mark.parametrize("version", ["v1alpha3", "v1beta1", "v1"])
def test_istio_kinds_recognised_in_every_version(version):
    for name in ("DestinationRule", "Gateway", "VirtualService"):
        assert kinds.kind_for(f"networking.istio.io/{version}", name) is kinds.BY_NAME[name]
    assert kinds.kind_for("networking.istio.io/v2", "Gateway") is None
    assert kinds.kind_for("v1", "Gateway") is None


def test_kind_for_core_and_discovery():
    assert kinds.kind_for("v1", "Service") is kinds.SERVICE
    assert kinds.kind_for("discovery.k8s.io/v1", "EndpointSlice") is kinds.ENDPOINT_SLICE
    assert kinds.kind_for("discovery.k8s.io/v1beta1", "EndpointSlice") is kinds.ENDPOINT_SLICE
    assert kinds.kind_for("apps/v1", "Deployment") is None
    assert kinds.kind_for("apps/v1", "Service") is None
    assert kinds.SERVICE.path() == "/api/v1/services"
    assert kinds.DESTINATION_RULE.path("x") == \
        "/apis/networking.istio.io/v1beta1/namespaces/x/destinationrules"


@pytest.mark.parametrize("version", ["v1alpha3", "v1beta1"])
def test_destination_rule_policies(version):
    parse = istio.parse_destination_rule
    dr = parse(istio_doc("DestinationRule", version, {
        "host": "web", "exportTo": ["."],
        "trafficPolicy": {"loadBalancer": {"simple": "LEAST_CONN"}, "portLevelSettings": [
            {"port": {"number": 8080}, "loadBalancer": {"consistentHash": {
                "httpCookie": {"name": "s", "path": "/", "ttl": "1.5s"},
                "ringHash": {"minimumRingSize": 64}}}},
            {"port": {"number": 9090}}]},
        "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}))
    assert dr.host == "web" and dr.export_to == (".",)
    assert dr.policy_for(80).simple == "LEAST_REQUEST"
    ch = dr.policy_for(8080).consistent_hash
    assert ch.http_cookie == istio.HttpCookie("s", "/", 1.5) and ch.minimum_ring_size == 64
    for ttl, want in ((None, None), ("0s", 0.0)):  # no ttl: no cookie generated; 0: session
        cookie = {"name": "s", **({"ttl": ttl} if ttl else {})}
        rule = parse(istio_doc("DestinationRule", version, {"host": "web", "trafficPolicy": {
            "loadBalancer": {"consistentHash": {"httpCookie": cookie}}}}))
        assert rule.policy_for(80).consistent_hash.http_cookie == istio.HttpCookie("s", "", want)
    assert ch.needs_http
    assert dr.policy_for(9090).simple == "LEAST_REQUEST"  # no lb of its own: the rule's
    assert dr.subsets == (("v1", (("version", "v1"),)),)
    src = parse(istio_doc("DestinationRule", version, {"host": "a", "trafficPolicy": {
        "loadBalancer": {"consistentHash": {"useSourceIp": True, "minimumRingSize": 8}}}}))
    assert src.load_balancer.consistent_hash.use_source_ip
    assert not src.load_balancer.consistent_hash.needs_http
    assert src.load_balancer.consistent_hash.minimum_ring_size == 8
    hdr = parse(istio_doc("DestinationRule", version, {"host": "a", "trafficPolicy": {
        "loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}}))
    assert hdr.load_balancer.consistent_hash.http_header_name == "x-user"
    bare = parse(istio_doc("DestinationRule", version, {"host": "a", "trafficPolicy": None}))
    assert bare.load_balancer is None and bare.policy_for(80) is None
    assert parse(istio_doc("DestinationRule", version, {
        "host": "a", "trafficPolicy": {"loadBalancer": {"simple": "UNSPECIFIED"}}})
    ).load_balancer.simple == ""


@pytest.mark.parametrize("spec, field", [
    ({}, "spec.host: required"),
    ({"host": 5}, "spec.host: expected a string"),
    ({"host": "a", "trafficPolicy": {"loadBalancer": {"simple": "FASTEST"}}},
     "spec.trafficPolicy.loadBalancer.simple: unknown policy 'FASTEST'"),
    ({"host": "a", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM",
                                                      "consistentHash": {"useSourceIp": True}}}},
     "spec.trafficPolicy.loadBalancer: only one of simple and consistentHash"),
    ({"host": "a", "trafficPolicy": {"loadBalancer": {"consistentHash": {
        "useSourceIp": True, "httpHeaderName": "x"}}}},
     "spec.trafficPolicy.loadBalancer.consistentHash: exactly one hash key"),
    ({"host": "a", "trafficPolicy": {"loadBalancer": {"consistentHash": {"useSourceIp": False,
                                                                         "x": 1}}}},
     "spec.trafficPolicy.loadBalancer.consistentHash: exactly one hash key"),
    ({"host": "a", "trafficPolicy": {"loadBalancer": {"consistentHash": {
        "httpCookie": {"path": "/"}}}}},
     "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name: required"),
    ({"host": "a", "trafficPolicy": {"loadBalancer": {"consistentHash": {
        "httpCookie": {"name": "c", "ttl": "soon"}}}}},
     "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl: expected a duration"),
    ({"host": "a", "trafficPolicy": {"loadBalancer": {"consistentHash": {
        "useSourceIp": True, "ringHash": {"minimumRingSize": "big"}}}}},
     "spec.trafficPolicy.loadBalancer.consistentHash.ringHash.minimumRingSize: expected"),
    ({"host": "a", "trafficPolicy": {"portLevelSettings": [
        {"port": {"number": 1}, "loadBalancer": {"simple": "NOPE"}}]}},
     "spec.trafficPolicy.portLevelSettings[0].loadBalancer.simple: unknown policy"),
])
def test_destination_rule_bad_shapes(spec, field):
    raises(istio.parse_destination_rule, istio_doc("DestinationRule", "v1beta1", spec), field)


@pytest.mark.parametrize("text, seconds", [("10s", 10), ("1.5s", 1.5), ("100ms", 0.1),
                                           ("2m", 120), ("1h", 3600), ("", 0), (None, 0)])
def test_durations(text, seconds):
    assert istio.parse_duration(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("version", ["v1alpha3", "v1beta1"])
def test_gateway(version):
    gw = istio.parse_gateway(istio_doc("Gateway", version, {
        "selector": {"kubeedge": "edgemesh-gateway"},
        "servers": [{"port": {"number": 80, "name": "http", "protocol": "http"},
                     "hosts": ["*"]},
                    {"port": {"number": 443, "name": "https", "protocol": "HTTPS"},
                     "hosts": ["shop.example.com"], "bind": "0.0.0.0",
                     "tls": {"mode": "SIMPLE", "credentialName": "shop-tls",
                             "minProtocolVersion": "TLSV1_2", "cipherSuites": ["A"]}}]}))
    assert gw.selector == {"kubeedge": "edgemesh-gateway"}
    http, https = gw.servers
    assert (http.port, http.protocol, http.port_name, http.hosts, http.tls) == \
        (80, "HTTP", "http", ("*",), None)
    assert https.tls == istio.ServerTLS(mode="SIMPLE", credential_name="shop-tls",
                                        min_protocol_version="TLSV1_2", cipher_suites=("A",))
    assert istio.parse_gateway(istio_doc("Gateway", version, {"servers": None})).servers == ()


@pytest.mark.parametrize("servers, field", [
    ([1], "spec.servers[0]: expected a mapping"),
    ([{"port": {"protocol": "HTTP"}}], "spec.servers[0].port.number: expected an integer"),
    ([{"port": {"number": 0, "protocol": "HTTP"}}], "spec.servers[0].port.number: expected"),
    ([{"port": {"number": 80}}], "spec.servers[0].port.protocol: required"),
    ([{"port": {"number": 80, "protocol": "TCP"}, "hosts": "*"}],
     "spec.servers[0].hosts: expected a list"),
    ([{"port": {"number": 80, "protocol": "TCP"}, "tls": {"httpsRedirect": "yes"}}],
     "spec.servers[0].tls.httpsRedirect: expected true or false"),
])
def test_gateway_bad_shapes(servers, field):
    raises(istio.parse_gateway, istio_doc("Gateway", "v1beta1", {"servers": servers}), field)


@pytest.mark.parametrize("version", ["v1alpha3", "v1beta1"])
def test_virtual_service(version):
    vs = istio.parse_virtual_service(istio_doc("VirtualService", version, {
        "hosts": ["*"], "gateways": ["edge-gateway"],
        "http": [{"name": "api", "match": [{"uri": {"prefix": "/api"}, "port": 8080,
                                            "headers": {"X-User": {"exact": "a"},
                                                        "x-any": None},
                                            "queryParams": {"Q": {"regex": "^1"}},
                                            "ignoreUriCase": True}],
                  "route": [{"destination": {"host": "web", "subset": "v1",
                                             "port": {"number": 80}}, "weight": 90},
                            {"destination": {"host": "web2"}}],
                  "rewrite": {"uri": "/"}, "timeout": "5s",
                  "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx"},
                  "headers": {"request": {"set": {"x-a": "1"}, "remove": ["x-b"]}}},
                 {"redirect": {"uri": "/new"}}, {"directResponse": {"status": 404}}],
        "tcp": [{"match": [{"port": 1883}], "route": [{"destination": {
            "host": "mqtt", "port": {"number": 1883}}}]}],
        "tls": [{"match": [{"sniHosts": ["a.example.com"], "port": 443}],
                 "route": [{"destination": {"host": "a"}}]}]}))
    assert vs.hosts == ("*",) and vs.gateways == ("edge-gateway",)
    api, redirect, direct = vs.http
    [m] = api.match
    assert m.uri == istio.StringMatch("prefix", "/api") and m.port == 8080 and m.ignore_uri_case
    assert m.headers == (("x-user", istio.StringMatch("exact", "a")),
                         ("x-any", istio.StringMatch("present", "")))
    assert m.query_params == (("Q", istio.StringMatch("regex", "^1")),)
    assert [(r.destination.host, r.destination.port, r.weight) for r in api.route] == \
        [("web", 80, 90), ("web2", None, 0)]
    assert api.route[0].destination.subset == "v1"
    assert (api.rewrite_uri, api.rewrite_authority, api.timeout) == ("/", None, 5.0)
    assert (api.retries_attempts, api.retries_per_try_timeout, api.retry_on) == (3, 2.0, "5xx")
    assert api.headers.request.set == (("x-a", "1"),) and api.headers.request.remove == ("x-b",)
    assert redirect.redirect == {"uri": "/new"} and direct.direct_response == {"status": 404}
    [tcp] = vs.tcp
    assert tcp.match[0].port == 1883 and tcp.route[0].destination.port == 1883
    assert vs.tls[0].match[0].sni_hosts == ("a.example.com",)
    empty = istio.parse_virtual_service(istio_doc("VirtualService", version, {
        "hosts": None, "http": None, "tcp": None}))
    assert (empty.hosts, empty.http, empty.tcp, empty.tls) == ((), (), (), ())


@pytest.mark.parametrize("http, field", [
    ([1], "spec.http[0]: expected a mapping"),
    ([{"match": [1]}], "spec.http[0].match[0]: expected a mapping"),
    ([{"match": [{"uri": "/x"}]}], "spec.http[0].match[0].uri: expected one of exact"),
    ([{"match": [{"uri": {"exact": "/", "prefix": "/"}}]}], "spec.http[0].match[0].uri:"),
    ([{"match": [{"uri": {"glob": "/*"}}]}], "spec.http[0].match[0].uri: expected one of"),
    ([{"route": [{"destination": {}}]}], "spec.http[0].route[0].destination.host: required"),
    ([{"route": [{"destination": {"host": "a", "port": {"number": "80"}}}]}],
     "spec.http[0].route[0].destination.port.number: expected an integer"),
    ([{"timeout": 5}], "spec.http[0].timeout: expected a duration"),
    ([{"rewrite": {"uri": 5}}], "spec.http[0].rewrite.uri: expected a string"),
])
def test_virtual_service_bad_shapes(http, field):
    raises(istio.parse_virtual_service, istio_doc("VirtualService", "v1beta1", {"http": http}),
           field)


# ---- robustness -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 70000) | st.text(max_size=4) |
    st.sampled_from(["http", "None", "Ready", "True", "1s", "172.17.0.1", "UDP"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["name", "port", "ports", "targetPort", "protocol", "addresses",
                         "conditions", "ready", "ip", "match", "uri", "route", "destination",
                         "host", "number", "loadBalancer", "consistentHash", "httpCookie",
                         "servers", "tls", "hosts", "headers", "request", "subsets", "type",
                         "status", "containers", "containerPort", "podIPs", "exact",
                         "ingress", "ipMode"]),
        inner, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(kinds.ALL), json_values, json_values, json_values)
def test_parsers_raise_only_manifest_error(kind, spec, status, items):
    doc = {"metadata": {"name": "x"}, "spec": spec, "status": status, "endpoints": items,
           "subsets": items, "ports": items, "data": items}
    try:
        kind.parse(doc)
    except ManifestError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["spec", "http"]), json_values)
def test_virtual_service_routes_raise_only_manifest_error(where, value):
    spec = {"http": [value]} if where == "http" else {"http": [{"match": [value],
                                                               "route": [value]}]}
    try:
        istio.parse_virtual_service({"metadata": {"name": "x"}, "spec": spec})
    except ManifestError:
        pass


def test_virtual_service_empty_header_match_means_present() -> None:
    from edgemesh.meta.istio import StringMatch, parse_virtual_service
    vs = parse_virtual_service({"metadata": {"name": "v", "namespace": "d"}, "spec": {
        "hosts": ["*"], "http": [{"match": [{"headers": {"x-canary": {}}}],
                                  "route": [{"destination": {"host": "a"}}]}]}})
    assert vs.http[0].match[0].headers == (("x-canary", StringMatch("present", "")),)


# ---- the Go EdgeMesh's examples -----------------------------------------------------------------

def test_every_go_edgemesh_example_document_parses():
    """tests/data/go_edgemesh/examples: each document of a kind we read parses; the rest
    (Deployments) are ones the files source ignores."""
    import pathlib

    import yaml
    root = pathlib.Path(__file__).parents[1] / "data" / "go_edgemesh" / "examples"
    seen: dict[str, int] = {}
    for path in sorted(root.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or "kind" not in doc or "apiVersion" not in doc:
                continue  # nic-includ-exclude/edgemesh.yaml is a config fragment
            kind = kinds.kind_for(doc["apiVersion"], doc["kind"])
            if kind is None:
                assert doc["kind"] == "Deployment", path
                continue
            kind.parse(doc)
            seen[kind.name] = seen.get(kind.name, 0) + 1
    assert seen == {"Service": 14, "Pod": 2, "Namespace": 2, "DestinationRule": 6,
                    "Gateway": 3, "VirtualService": 3}
    tls = istio.parse_gateway(next(d for d in yaml.safe_load_all(
        (root / "hostname-lb-random-gateway-tls.yaml").read_text()) if d["kind"] == "Gateway"))
    server = tls.servers[0]
    assert (server.protocol, server.tls.credential_name, server.tls.mode,
            server.tls.go_compat) == ("HTTP", "gw-secret", "MUTUAL", False)
    assert len(server.tls.cipher_suites) == 10


def test_quick_init_builds_the_same_frozen_objects_as_dataclasses() -> None:
    import dataclasses

    from edgemesh.meta import models as m
    meta = m.ObjectMeta("web", namespace="demo")
    assert meta.labels == {} and meta.annotations == {} and meta.uid == ""
    pod = m.Pod(meta, pod_ips=("10.0.0.1",))
    assert pod == m.Pod(meta=m.ObjectMeta(name="web", namespace="demo"), pod_ips=("10.0.0.1",))
    assert hash(pod) == hash(dataclasses.replace(pod, phase=""))
    assert dataclasses.replace(pod, phase="Running").phase == "Running"
    with pytest.raises(dataclasses.FrozenInstanceError):
        pod.phase = "Running"  # type: ignore[misc]
    with pytest.raises(TypeError):
        m.Pod()  # type: ignore[call-arg]
