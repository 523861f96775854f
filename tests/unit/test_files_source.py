"""The files source: manifests directories → store, reloads, bad documents, derived endpoints."""
from __future__ import annotations

import json
import logging
import os
import textwrap
import time

import gevent
import pytest

from edgemesh.meta import files
from edgemesh.meta.files import FilesSource
from edgemesh.meta.models import SERVICE_NAME_LABEL
from edgemesh.meta.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def service(name: str, ns: str = "demo", selector: str = "", port: int = 80,
            target: str | int = 8080, ip: str = "10.96.0.10") -> str:
    lines = ["apiVersion: v1", "kind: Service", f"metadata: {{name: {name}, namespace: {ns}}}",
             "spec:", f"  clusterIP: {ip}",
             f"  ports: [{{name: http, port: {port}, targetPort: {target}}}]"]
    if selector:
        lines.append(f"  selector: {{app: {selector}}}")
    return "\n".join(lines) + "\n"


def pod(name: str, ip: str, ns: str = "demo", app: str = "web", node: str = "edge-node-1",
        ready: str = "True", phase: str = "Running", cport: int = 8080, extra_meta: str = "",
        extra_spec: str = "") -> str:
    lines = ["apiVersion: v1", "kind: Pod",
             f"metadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}{extra_meta}}}",
             "spec:", f"  nodeName: {node}{extra_spec}",
             "  containers: [{name: c, image: x, ports: "
             f"[{{name: http, containerPort: {cport}}}]}}]",
             "status:", f"  phase: {phase}",
             f'  conditions: [{{type: Ready, status: "{ready}"}}]']
    if ip:
        lines.append(f"  podIP: {ip}")
    return "\n".join(lines) + "\n"


def docs(*parts: str) -> str:
    return "---\n".join(parts)


def loaded(tmp_path, *dirs) -> tuple[Store, FilesSource]:
    store = Store()
    source = FilesSource(store, [str(d) for d in dirs] or [str(tmp_path)])
    source.poll()
    return store, source


def endpoints(store: Store, ns: str, name: str, **kw) -> list[tuple[str, int, str]]:
    svc = store.service(ns, name)
    assert svc is not None, f"{ns}/{name} not in store"
    return [(b.ip, b.port, b.node_name) for b in store.backends(svc, svc.ports[0], **kw)]


def bad_count() -> float:
    return files.BAD_DOCUMENTS.value


# ---- loading ----------------------------------------------------------------------------------

def test_loads_every_manifest_file_below_each_directory(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "one.yaml", service("one", ip="10.96.0.1"))
    write(a / "nested" / "deeper" / "two.yml", service("two", ip="10.96.0.2"))
    write(b / "three.json", json.dumps({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "three", "namespace": "x"},
        "spec": {"clusterIP": "10.96.0.3", "ports": [{"port": 53, "protocol": "UDP"}]}}))
    write(a / "notes.txt", service("ignored-txt"))
    write(a / ".hidden" / "four.yaml", service("ignored-hidden"))
    write(a / "..data" / "five.yaml", service("ignored-configmap-copy"))
    store, source = loaded(tmp_path, a, b)
    assert sorted(s.meta.name for s in store.services()) == ["one", "three", "two"]
    assert store.service_by_ip("10.96.0.3").ports[0].protocol == "UDP"
    assert store.synced and source.errors == {}


def test_multi_document_yaml_skips_empty_and_ignores_unknown_kinds(tmp_path, caplog):
    deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {}\n"
    configmap = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {a: b}\n"
    write(tmp_path / "all.yaml", "---\n" + docs(service("web"), "", deployment, configmap,
                                                 pod("web-1", "172.17.1.10")) + "---\n")
    before = bad_count()
    with caplog.at_level(logging.DEBUG, logger="edgemesh.meta.files"):
        store, source = loaded(tmp_path)
    assert store.service("demo", "web") and source.merged.pod("demo", "web-1")
    assert store.get("Pod", "demo", "web-1") is None  # kept by the source, not the store
    assert source.errors == {} and bad_count() == before
    assert "ignored 2 documents" in caplog.text


def test_list_kinds_in_yaml_and_json_and_concatenated_json(tmp_path):
    write(tmp_path / "list.yaml", """\
        apiVersion: v1
        kind: List
        items:
          - apiVersion: v1
            kind: Service
            metadata: {name: a, namespace: demo}
            spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
          - apiVersion: apps/v1
            kind: Deployment
            metadata: {name: ignored}
        """)
    # `kubectl get svc -o json` from the API: a ServiceList whose items lack kind/apiVersion
    write(tmp_path / "svclist.json", json.dumps({
        "apiVersion": "v1", "kind": "ServiceList", "metadata": {"resourceVersion": "5"},
        "items": [{"metadata": {"name": "b", "namespace": "demo"},
                   "spec": {"clusterIP": "10.96.0.2", "ports": [{"port": 80}]}}]}))
    write(tmp_path / "stream.json", "\n".join(json.dumps({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}) for n in "xy"))
    write(tmp_path / "empty-list.yaml", "apiVersion: v1\nkind: List\nitems: null\n")
    store, source = loaded(tmp_path)
    assert source.errors == {}
    assert sorted(s.meta.name for s in store.services()) == ["a", "b"]
    assert {"x", "y"} <= {n.meta.name for n in store.list("Namespace")}


def test_timestamps_stay_strings_so_raw_documents_are_json(tmp_path):
    write(tmp_path / "s.yaml", service("web").replace(
        "namespace: demo}", "namespace: demo, creationTimestamp: 2024-01-01T00:00:00Z}"))
    store = Store(keep_raw=True)  # as with the metadata cache
    FilesSource(store, [str(tmp_path)]).poll()
    raw = store.raw_snapshot()["Service"][0]
    assert raw["metadata"]["creationTimestamp"] == "2024-01-01T00:00:00Z"
    json.dumps(store.raw_snapshot())


def test_same_object_in_two_files_last_path_wins(tmp_path, caplog):
    write(tmp_path / "a.yaml", service("web", ip="10.96.0.1"))
    write(tmp_path / "b.yaml", service("web", ip="10.96.0.2"))
    store, _ = loaded(tmp_path)
    assert store.service("demo", "web").cluster_ips == ("10.96.0.2",)
    assert "defined twice" in caplog.text


def test_missing_directory_is_watched_until_it_appears(tmp_path, caplog):
    later = tmp_path / "later"
    store, source = loaded(tmp_path, later)
    assert store.synced and store.count("Service") == 0
    assert "does not exist" in caplog.text
    write(later / "s.yaml", service("web"))
    assert source.poll()
    assert store.service("demo", "web")


def test_every_example_loads_cleanly(tmp_path):
    store, source = loaded(tmp_path, os.path.join(ROOT, "examples"))
    assert source.errors == {} and store.count("Service") > 0


def test_examples_hello_loadbalancing_gateway(tmp_path):
    store, source = loaded(tmp_path, *(os.path.join(ROOT, "examples", name)
                                       for name in ("hello", "loadbalancing", "gateway")))
    assert source.errors == {}
    assert endpoints(store, "hello", "web") == [("172.17.1.10", 8080, "edge-node-1"),
                                                ("172.17.2.10", 8080, "edge-node-2")]
    assert endpoints(store, "hello", "echo") == [("172.17.1.20", 7007, "edge-node-1"),
                                                 ("172.17.2.20", 7007, "edge-node-2")]
    assert endpoints(store, "hello", "telemetry") == [("172.17.2.30", 5005, "edge-node-2")]
    assert [b.hostname for b in store.backends(store.service("hello", "db"),
                                               store.service("hello", "db").ports[0])] == \
        ["db-0", "db-1"]
    assert store.service("hello", "docs").external_name == "kubernetes.io"
    policies = {s.meta.name: store.destination_rule_for(s) for s in store.services()
                if s.meta.namespace == "lb"}
    assert policies["random"].load_balancer.simple == "RANDOM"
    assert policies["by-source-ip"].load_balancer.consistent_hash.use_source_ip
    assert policies["by-header"].load_balancer.consistent_hash.http_header_name == "x-user"
    assert policies["by-cookie"].load_balancer.consistent_hash.http_cookie.ttl == 3600
    assert store.count("Gateway") == 1 and store.count("VirtualService") == 2


# ---- changes ----------------------------------------------------------------------------------

def test_edit_add_and_delete_are_applied_on_the_next_poll(tmp_path):
    write(tmp_path / "web.yaml", service("web", ip="10.96.0.1"))
    store, source = loaded(tmp_path)
    seen: list[frozenset[str]] = []
    store.subscribe(seen.append)
    assert not source.poll() and seen == []  # nothing changed, nothing re-applied

    write(tmp_path / "web.yaml", service("web", ip="10.96.0.9"))  # same size, new content
    assert source.poll()
    assert store.service("demo", "web").cluster_ips == ("10.96.0.9",)
    assert seen == [frozenset({"Service"})]

    write(tmp_path / "sub" / "db.yaml", service("db", ip="10.96.0.2"))
    source.poll()
    assert store.service("demo", "db")

    os.unlink(tmp_path / "web.yaml")
    source.poll()
    assert store.service("demo", "web") is None and store.service("demo", "db")


def test_running_source_picks_up_a_change_within_two_seconds(tmp_path):
    write(tmp_path / "web.yaml", service("web", ip="10.96.0.1"))
    store = Store()
    source = FilesSource(store, [str(tmp_path)])
    source.start()
    try:
        assert store.synced and store.service("demo", "web")  # loaded before start returns
        assert source.poll_interval <= 1.0  # a change lands within two polls
        write(tmp_path / "web.yaml", service("web", ip="10.96.0.77"))
        start = time.monotonic()
        while store.service("demo", "web").cluster_ips != ("10.96.0.77",):
            assert time.monotonic() - start < 10, "change never applied"
            gevent.sleep(0.05)
    finally:
        source.stop()


# ---- bad documents ----------------------------------------------------------------------------

def test_syntax_error_keeps_the_files_last_good_state(tmp_path, caplog):
    path = tmp_path / "web.yaml"
    write(tmp_path / "other.yaml", service("other", ip="10.96.0.5"))
    write(path, docs(service("web", ip="10.96.0.1"), pod("web-1", "172.17.1.10")))
    store, source = loaded(tmp_path)
    before = bad_count()
    write(path, docs(service("web", ip="10.96.0.2"), "kind: Pod\nmetadata: {name: [oops\n"))
    source.poll()
    [problem] = source.errors[str(path)]
    assert problem.startswith(f"{path}:doc#2: YAML syntax error at line ")
    assert problem in caplog.text and "keeping its last good contents" in caplog.text
    assert bad_count() == before + 1
    assert store.service("demo", "web").cluster_ips == ("10.96.0.1",)  # whole file kept
    assert source.merged.pod("demo", "web-1")
    write(tmp_path / "other.yaml", service("other", ip="10.96.0.6"))  # others still reload
    source.poll()
    assert store.service("demo", "other").cluster_ips == ("10.96.0.6",)

    write(path, service("web", ip="10.96.0.3"))  # fixed: applied, error cleared
    source.poll()
    assert source.errors == {}
    assert store.service("demo", "web").cluster_ips == ("10.96.0.3",)
    assert source.merged.pod("demo", "web-1") is None


def test_malformed_object_of_a_known_kind_is_reported_with_file_and_index(tmp_path):
    path = tmp_path / "web.yaml"
    write(path, docs(service("web", ip="10.96.0.1"), pod("web-1", "172.17.1.10")))
    store, source = loaded(tmp_path)
    before = bad_count()
    broken = service("web", ip="10.96.0.2").replace("port: 80", 'port: "abc"')
    write(path, docs(pod("web-1", "172.17.1.10"), broken))
    source.poll()
    assert source.errors[str(path)] == [
        f"{path}:doc#2: Service web: spec.ports[0].port: expected an integer, got 'abc'"]
    assert bad_count() == before + 1
    assert store.service("demo", "web").cluster_ips == ("10.96.0.1",)


def test_every_bad_document_of_a_file_is_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    write(path, docs("- just\n- a list\n", "apiVersion: v1\nmetadata: {name: x}\n",
                     "kind: Service\nmetadata: {name: x}\n",
                     "apiVersion: v1\nkind: Service\nmetadata: {namespace: demo}\n",
                     service("fine"),
                     "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n"
                     "  metadata: {name: p}\n  status: {conditions: 7}\n"))
    write(tmp_path / "good.yaml", service("good", ip="10.96.0.9"))
    store, source = loaded(tmp_path)
    assert source.errors[str(path)] == [
        f"{path}:doc#1: expected a Kubernetes object (a mapping), got a list",
        f"{path}:doc#2: kind: required",
        f"{path}:doc#3: apiVersion: required",
        f"{path}:doc#4: Service ?: metadata.name: required",
        f"{path}:doc#6.items[0]: Pod p: status.conditions: expected a list"]
    # never good: none of it is applied, but other files are
    assert store.service("demo", "fine") is None and store.service("demo", "good")


def test_bad_json_and_undecodable_files(tmp_path):
    write(tmp_path / "bad.json", '{"apiVersion": "v1", "kind": "Service",\n "metadata": }')
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    store, source = loaded(tmp_path)
    assert source.errors[str(tmp_path / "bad.json")][0].startswith(
        f"{tmp_path / 'bad.json'}:doc#1: JSON syntax error at line 2, column 14:")
    assert "cannot read" in source.errors[str(tmp_path / "binary.yaml")][0]
    assert store.synced


# ---- endpoints from pods ----------------------------------------------------------------------

def test_selector_service_gets_endpoints_from_ready_pods(tmp_path):
    write(tmp_path / "web.yaml", docs(
        service("web", selector="web", target="http"),
        pod("web-1", "172.17.1.10", node="edge-node-1"),
        pod("web-2", "172.17.2.10", node="edge-node-2"),
        pod("starting", "172.17.1.11", ready="False"),
        pod("pending", "", phase="Pending", ready="False"),
        pod("done", "172.17.1.12", phase="Succeeded", ready="False"),
        pod("other-app", "172.17.1.13", app="db"),
        pod("other-ns", "172.17.1.14", ns="elsewhere")))
    store, _ = loaded(tmp_path)
    assert endpoints(store, "demo", "web") == [("172.17.1.10", 8080, "edge-node-1"),
                                              ("172.17.2.10", 8080, "edge-node-2")]
    assert endpoints(store, "demo", "web", include_not_ready=True) == [
        ("172.17.1.10", 8080, "edge-node-1"), ("172.17.1.11", 8080, "edge-node-1"),
        ("172.17.2.10", 8080, "edge-node-2")]
    [sl] = store.list("EndpointSlice")
    assert sl.meta.name == "web-derived" and sl.meta.labels[SERVICE_NAME_LABEL] == "web"
    assert sl.address_type == "IPv4"
    assert {e.target_ref.name for e in sl.endpoints} == {"web-1", "web-2", "starting"}


def test_named_target_port_resolves_per_pod(tmp_path):
    write(tmp_path / "web.yaml", docs(
        service("web", selector="web", target="http"),
        pod("old", "172.17.1.10", cport=8080), pod("new", "172.17.2.10", cport=9090),
        pod("unnamed", "172.17.2.11").replace("name: http, ", "")))
    store, _ = loaded(tmp_path)
    # two port mappings → two slices; the pod without the named port serves no endpoint
    assert endpoints(store, "demo", "web") == [("172.17.1.10", 8080, "edge-node-1"),
                                              ("172.17.2.10", 9090, "edge-node-1")]
    assert sorted(s.meta.name for s in store.list("EndpointSlice")) == \
        ["web-derived", "web-derived-2", "web-derived-3"]


def test_numeric_target_port_and_udp_protocol(tmp_path):
    write(tmp_path / "dns.yaml", docs(
        service("dns", selector="dns", port=53, target=5353).replace(
            "targetPort: 5353", "targetPort: 5353, protocol: UDP"),
        pod("dns-1", "172.17.1.53", app="dns")))
    store, _ = loaded(tmp_path)
    svc = store.service("demo", "dns")
    assert [(b.ip, b.port) for b in store.backends(svc, svc.ports[0])] == [("172.17.1.53", 5353)]
    [sl] = store.list("EndpointSlice")
    assert sl.ports[0].protocol == "UDP"


def test_terminating_pod_is_a_serving_fallback_only(tmp_path):
    gone = pod("leaving", "172.17.1.10", extra_meta=", deletionTimestamp: 2024-01-01T00:00:00Z")
    write(tmp_path / "web.yaml", docs(service("web", selector="web"), gone))
    store, _ = loaded(tmp_path)
    [ep] = next(store.list("EndpointSlice")).endpoints
    assert (ep.ready, ep.serving, ep.terminating) == (False, True, True)
    assert endpoints(store, "demo", "web") == [("172.17.1.10", 8080, "edge-node-1")]
    write(tmp_path / "web2.yaml", pod("fresh", "172.17.2.10", node="edge-node-2"))
    store, _ = loaded(tmp_path)
    assert endpoints(store, "demo", "web") == [("172.17.2.10", 8080, "edge-node-2")]


def test_hostname_only_when_subdomain_names_the_service(tmp_path):
    write(tmp_path / "db.yaml", docs(
        service("db", selector="db", ip="None"),
        pod("db-0", "172.17.1.40", app="db", extra_spec="\n  hostname: db-0\n  subdomain: db"),
        pod("db-1", "172.17.1.41", app="db", extra_spec="\n  hostname: db-1\n  subdomain: x")))
    store, _ = loaded(tmp_path)
    svc = store.service("demo", "db")
    assert svc.headless
    assert {b.ip: b.hostname for b in store.backends(svc, svc.ports[0])} == \
        {"172.17.1.40": "db-0", "172.17.1.41": ""}


def test_ipv6_pods_get_their_own_slice(tmp_path):
    dual = pod("web-1", "172.17.1.10").replace(
        "podIP: 172.17.1.10", "podIP: 172.17.1.10\n  podIPs: [{ip: 172.17.1.10}, {ip: 'fd00::10'}]")
    write(tmp_path / "web.yaml", docs(service("web", selector="web"), dual))
    store, _ = loaded(tmp_path)
    slices = {s.meta.name: s for s in store.list("EndpointSlice")}
    assert set(slices) == {"web-derived", "web-derived-ipv6"}
    assert slices["web-derived-ipv6"].address_type == "IPv6"
    assert slices["web-derived-ipv6"].endpoints[0].addresses == ("fd00::10",)


def test_no_derivation_when_slices_or_endpoints_exist(tmp_path):
    explicit = textwrap.dedent("""\
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata: {name: web-abc, namespace: demo, labels: {kubernetes.io/service-name: web}}
        addressType: IPv4
        endpoints: [{addresses: [172.17.9.9]}]
        ports: [{name: http, port: 9999}]
        """)
    legacy = textwrap.dedent("""\
        apiVersion: v1
        kind: Endpoints
        metadata: {name: api, namespace: demo}
        subsets: [{addresses: [{ip: 172.17.9.8}], ports: [{name: http, port: 9998}]}]
        """)
    external = textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: ext, namespace: demo}
        spec: {type: ExternalName, externalName: example.org, selector: {app: web}}
        """)
    write(tmp_path / "all.yaml", docs(
        service("web", selector="web"), explicit, service("api", selector="web", ip="10.96.0.2"),
        legacy, external, pod("web-1", "172.17.1.10")))
    store, _ = loaded(tmp_path)
    assert endpoints(store, "demo", "web") == [("172.17.9.9", 9999, "")]
    assert endpoints(store, "demo", "api") == [("172.17.9.8", 9998, "")]
    assert [s.meta.name for s in store.list("EndpointSlice")] == ["web-abc"]


def test_derived_endpoints_follow_pod_changes(tmp_path):
    write(tmp_path / "svc.yaml", service("web", selector="web"))
    write(tmp_path / "pod.yaml", pod("web-1", "172.17.1.10", ready="False"))
    store, source = loaded(tmp_path)
    assert endpoints(store, "demo", "web") == []
    write(tmp_path / "pod.yaml", pod("web-1", "172.17.1.10", ready="True"))
    source.poll()
    assert endpoints(store, "demo", "web") == [("172.17.1.10", 8080, "edge-node-1")]


# ---- namespaces -------------------------------------------------------------------------------

def test_namespaces_of_objects_exist_without_namespace_documents(tmp_path):
    write(tmp_path / "a.yaml", docs(service("web", ns="shop"),
                                    "apiVersion: v1\nkind: Namespace\nmetadata: {name: lb}\n"
                                    "status: {phase: Terminating}\n"))
    store, _ = loaded(tmp_path)
    names = {n.meta.name: n.phase for n in store.list("Namespace")}
    assert names == {"shop": "Active", "lb": "Terminating", "default": "Active"}
    assert "shop" in store.namespaces() and "nowhere" not in store.namespaces()


@pytest.mark.parametrize("name", ["x.yaml", "x.yml", "x.json"])
def test_each_extension_is_read(tmp_path, name):
    text = json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n1"}})
    write(tmp_path / name, text)
    store, _ = loaded(tmp_path)
    assert store.get("Namespace", "", "n1")


def test_configmap_volume_layout_is_read_once_and_follows_updates(tmp_path):
    """A ConfigMap volume: real files in ``..<timestamp>/``, ``..data`` links to it, and each
    key is a link through ``..data``; an update swaps ``..data`` atomically."""
    first = tmp_path / "..2024_01_01"
    write(first / "web.yaml", service("web", ip="10.96.0.1"))
    os.symlink(first.name, tmp_path / "..data")
    os.symlink("..data/web.yaml", tmp_path / "web.yaml")
    store, source = loaded(tmp_path)
    assert source.errors == {} and store.service("demo", "web").cluster_ips == ("10.96.0.1",)
    second = tmp_path / "..2024_01_02"
    write(second / "web.yaml", service("web", ip="10.96.0.2"))
    os.symlink(second.name, tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    source.poll()
    assert store.service("demo", "web").cluster_ips == ("10.96.0.2",)


def test_a_directory_that_cannot_be_listed_keeps_its_services(tmp_path, monkeypatch, caplog):
    """Out of descriptors (EMFILE), listing fails: that is not every manifest removed."""
    write(tmp_path / "web.yaml", service("web"))
    store, source = loaded(tmp_path)
    real = os.scandir

    def exhausted(path):
        raise OSError(24, "Too many open files")
    monkeypatch.setattr(files.os, "scandir", exhausted)
    with caplog.at_level(logging.INFO, logger="edgemesh.meta.files"):
        for _ in range(3):
            source.poll()
        assert store.service("demo", "web") is not None
        monkeypatch.setattr(files.os, "scandir", real)
        source.poll()
    said = [r.getMessage() for r in caplog.records]
    assert sum("cannot list" in m for m in said) == 1
    assert any("can list" in m and "again" in m for m in said)
    assert store.service("demo", "web") is not None
    os.remove(tmp_path / "web.yaml")
    source.poll()  # a listing that works and lacks the file: removed
    assert store.service("demo", "web") is None


def test_services_sharing_a_selector_label_each_follow_their_pods(tmp_path):
    """The selector index holds one Service name per label, or a set once several share it:
    both forms, and the way back to one, find the Services a Pod change touches."""
    write(tmp_path / "svcs.yaml", docs(service("web", selector="web", ip="10.96.0.10"),
                                       service("www", selector="web", ip="10.96.0.11")))
    write(tmp_path / "pods.yaml", pod("web-1", "172.17.0.5"))
    store, source = loaded(tmp_path)
    assert endpoints(store, "demo", "web") == endpoints(store, "demo", "www") == \
        [("172.17.0.5", 8080, "edge-node-1")]
    write(tmp_path / "svcs.yaml", service("web", selector="web", ip="10.96.0.10"))
    write(tmp_path / "pods.yaml", docs(pod("web-1", "172.17.0.5"), pod("web-2", "172.17.0.6")))
    source.poll()
    assert store.service("demo", "www") is None
    assert [ip for ip, _, _ in endpoints(store, "demo", "web")] == ["172.17.0.5", "172.17.0.6"]
