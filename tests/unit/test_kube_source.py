"""The kube source against tests/kubeapi.py: a real HTTP server with apiserver watch semantics.

Source and server run in this process under gevent, so a test can change the server between
two steps of the client deterministically (no yield in between), and wait for results by
polling (``wait_for``), never by sleeping.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgemesh.config import KubeAPIConfig
from edgemesh.errors import ConfigError, RemoteProtocolError
from edgemesh.meta import kube
from edgemesh.meta.kube import KubeSource, connection_from_config
from edgemesh.meta.kubeconn import Connection
from edgemesh.meta.kubewire import LineSplitter, decode_event, list_page
from edgemesh.meta.store import Store
from edgemesh.runtime import metrics
from edgemesh.runtime.admin import Admin
from tests import kubeapi
from tests.kubeapi import KubeAPI
from tests.netlab import wait_for


@pytest.fixture
def api():
    with KubeAPI() as server:
        yield server


class Client:
    """A started KubeSource with its store and admin, stopped at the end of the test."""

    def __init__(self, url: str, **kwargs) -> None:
        self.store = Store()
        self.admin = Admin()
        kwargs.setdefault("backoff_max", 0.2)
        kwargs.setdefault("optional_retry", 0.2)
        self.source = KubeSource(self.store, Connection(url), admin=self.admin, **kwargs)
        self.source.start()

    def names(self, kind: str = "Service") -> set[str]:
        return {o.meta.name for o in self.store.list(kind)}

    def state(self, slot: str) -> kube.KindState:
        return self.source.states[slot]

    def wait_synced(self) -> None:
        wait_for(lambda: self.store.synced, timeout=10, what="first sync")


@pytest.fixture
def client_factory():
    made: list[Client] = []

    def make(url: str, **kwargs) -> Client:
        c = Client(url, **kwargs)
        made.append(c)
        return c
    yield make
    for c in made:
        c.source.stop()


def counter(name: str, *labels: str) -> float:
    metric = metrics.REGISTRY.get(name)
    assert metric is not None
    return metric.labels(*labels).value


# ---- wire format (sans-IO) --------------------------------------------------------------------

@given(st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_line_splitter_is_independent_of_chunk_boundaries(cuts):
    events = [b'{"type":"ADDED","object":{"metadata":{"name":"a%d"}}}' % i for i in range(5)]
    body = b"\n".join(events) + b"\n"
    points = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    splitter = LineSplitter()
    out = []
    for a, b in zip(points, points[1:], strict=False):
        out.extend(splitter.feed(body[a:b]))
    assert out == events and splitter.pending == 0


def test_line_splitter_bounds_an_endless_line():
    splitter = LineSplitter(limit=100)
    splitter.feed(b"x" * 90)
    with pytest.raises(RemoteProtocolError):
        splitter.feed(b"x" * 20)


def test_decode_event_rejects_what_is_not_a_watch_event():
    assert decode_event(b'{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"7"}}}'
                        ).resource_version == "7"
    for bad in (b"not json", b"[]", b'{"type":"SOMETHING","object":{}}', b'{"type":"ADDED"}'):
        with pytest.raises(RemoteProtocolError):
            decode_event(bad)


def test_list_page_is_lenient_about_null_items_and_missing_rv():
    page = list_page(b'{"kind":"PodList","metadata":{},"items":null}')
    assert page.items == [] and page.resource_version == "" and page.continue_token == ""


# ---- list and watch ---------------------------------------------------------------------------

def test_initial_list_then_watch_from_the_list_rv(api, client_factory):
    kubeapi.cluster(api, services=3)
    c = client_factory(api.url)
    c.wait_synced()
    assert c.names() == {"svc0", "svc1", "svc2"}
    svc = c.store.service("default", "svc1")
    assert [b.ip for b in c.store.backends(svc, svc.ports[0])] == ["172.17.0.11"]
    first_list = api.requests_for("services", watch=False)[0]
    assert first_list.params["resourceVersion"] == "0" and first_list.params["limit"]
    wait_for(lambda: api.watching("services"), what="services watch")
    watch = api.requests_for("services", watch=True)[0]
    assert watch.params["watch"] == "true" and watch.params["allowWatchBookmarks"] == "true"
    assert 300 <= int(watch.params["timeoutSeconds"]) <= 600
    assert watch.params["resourceVersion"] == str(api.rv)  # the list's RV: no replay, no gap
    assert c.admin.not_ready() == {}


def test_updates_deletes_and_recreation_arrive_by_watch(api, client_factory):
    kubeapi.cluster(api, services=2)
    c = client_factory(api.url)
    c.wait_synced()
    wait_for(lambda: api.watching("services") and api.watching("endpointslices"))
    api.put("services", kubeapi.service("svc0", ip="10.96.5.5"))
    api.delete("endpointslices", "default", "svc1-abcde")
    api.put("services", kubeapi.service("svc9", ip="10.96.0.99"))
    old_uid = c.store.service("default", "svc1").meta.uid
    api.delete("services", "default", "svc1")
    api.put("services", kubeapi.service("svc1", ip="10.96.7.7"))
    wait_for(lambda: c.store.service_by_ip("10.96.7.7"), what="recreated svc1")
    assert c.store.service("default", "svc1").meta.uid != old_uid
    assert c.store.service_by_ip("10.96.5.5").meta.name == "svc0"
    assert c.names() == {"svc0", "svc1", "svc9"}
    wait_for(lambda: c.store.count("EndpointSlice") == 1, what="slice deletion")
    assert len(api.requests_for("services", watch=False)) == 1  # all by watch, no relist


def test_pagination_and_an_expired_continue_token(api, client_factory, monkeypatch):
    monkeypatch.setattr(kube, "PAGE_SIZE", 2)
    for i in range(5):
        api.put("services", kubeapi.service(f"s{i}", ip=f"10.96.1.{i}"))
    expired = []

    def expire_first_continue(req):
        if req.resource == "services" and "continue" in req.params and not expired:
            expired.append(req)
            return 410
        return None
    api.on_request = expire_first_continue
    c = client_factory(api.url)
    wait_for(lambda: c.state("Service").listed, what="services listed")
    assert c.names() == {f"s{i}" for i in range(5)}
    lists = [r.params for r in api.requests_for("services", watch=False)]
    # page 1 (rv 0), page 2 → 410, then from scratch with rv "" (consistent read), 3 pages
    assert lists[0]["resourceVersion"] == "0" and "continue" in lists[1]
    assert "resourceVersion" not in lists[2] and "continue" not in lists[2]
    assert [("continue" in p) for p in lists[2:]] == [False, True, True]


def test_resume_after_a_dropped_stream_loses_and_duplicates_nothing(api, client_factory):
    kubeapi.cluster(api, services=1)
    c = client_factory(api.url)
    c.wait_synced()
    wait_for(lambda: api.watching("services"))
    api.put("services", kubeapi.service("a", ip="10.96.2.1"))
    wait_for(lambda: "a" in c.names())
    last_seen = c.state("Service").rv
    assert last_seen == str(api.rv)
    # The stream dies; before the client can notice, two changes happen (same greenlet: no
    # yield, so the client cannot be watching yet).
    assert api.drop_watches("services") == 1
    api.put("services", kubeapi.service("b", ip="10.96.2.2"))
    api.delete("services", "default", "a")
    wait_for(lambda: c.names() == {"svc0", "b"}, what="changes made during the gap")
    watches = api.requests_for("services", watch=True)
    assert watches[-1].params["resourceVersion"] == last_seen
    assert len(api.requests_for("services", watch=False)) == 1  # no relist was needed
    resumed = api.streams_for("services")[-1]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in resumed.sent] == \
        [("ADDED", "b"), ("DELETED", "a")]  # exactly the gap's changes, nothing twice


def test_a_stream_cut_inside_an_event_is_not_applied(api, client_factory):
    api = KubeAPI(chunking="split").start()
    try:
        kubeapi.cluster(api, services=1)
        c = client_factory(api.url)
        c.wait_synced()
        wait_for(lambda: api.watching("services"))
        rv = c.state("Service").rv
        api.drop_watches("services", mid_event=True)
        api.put("services", kubeapi.service("later", ip="10.96.3.1"))
        wait_for(lambda: "later" in c.names(), what="update after the cut")
        assert api.requests_for("services", watch=True)[-1].params["resourceVersion"] == rv
        assert "phantom" not in c.names()  # half an event is never applied
        assert counter("edgemesh_meta_watch_restarts_total", "Service", "protocol") + \
            counter("edgemesh_meta_watch_restarts_total", "Service", "dropped") >= 1
    finally:
        api.stop()


def test_410_on_watch_relists_from_scratch(api, client_factory):
    kubeapi.cluster(api, services=2)
    c = client_factory(api.url)
    c.wait_synced()
    wait_for(lambda: api.watching("services"))
    relists = counter("edgemesh_meta_relists_total", "Service")
    api.drop_watches("services")
    api.delete("services", "default", "svc0")
    api.put("services", kubeapi.service("fresh", ip="10.96.4.4"))
    api.compact()  # the client's RV is now too old: ERROR 410 Expired on the re-watch
    wait_for(lambda: c.names() == {"svc1", "fresh"}, what="state after relist")
    expired = api.streams_for("services")[1].sent
    assert [(e["type"], e["object"]["code"]) for e in expired] == [("ERROR", 410)]
    relist = api.requests_for("services", watch=False)[-1]
    assert "resourceVersion" not in relist.params  # rv "" after a 410 (K2.6)
    assert counter("edgemesh_meta_relists_total", "Service") == relists + 1


def test_http_410_on_the_watch_request_relists(api, client_factory):
    kubeapi.cluster(api, services=1)
    c = client_factory(api.url)
    c.wait_synced()
    wait_for(lambda: api.watching("services"))
    lists = len(api.requests_for("services", watch=False))
    api.fail_next("services", 410)
    api.drop_watches("services")
    wait_for(lambda: len(api.requests_for("services", watch=False)) == lists + 1,
             what="relist after HTTP 410")
    wait_for(lambda: api.watching("services"))
    api.put("services", kubeapi.service("after", ip="10.96.6.6"))
    wait_for(lambda: "after" in c.names())


def test_error_event_500_backs_off_and_rewatches_from_the_last_rv(api, client_factory):
    kubeapi.cluster(api, services=1)
    c = client_factory(api.url)
    c.wait_synced()
    wait_for(lambda: api.watching("services"))
    rv = c.state("Service").rv
    api.send_error("services", 500, "stop to watch sqlite/meta_v2")
    api.put("services", kubeapi.service("later", ip="10.96.3.9"))
    wait_for(lambda: "later" in c.names())
    assert api.requests_for("services", watch=True)[-1].params["resourceVersion"] == rv
    assert len(api.requests_for("services", watch=False)) == 1
    assert counter("edgemesh_meta_watch_restarts_total", "Service", "http_500") >= 1


def test_repeated_watch_failures_end_in_a_relist(api, client_factory):
    kubeapi.cluster(api, services=1)
    c = client_factory(api.url)
    c.wait_synced()
    wait_for(lambda: api.watching("services"))
    api.fail_next("services", 503, 503, 503)
    api.drop_watches("services")
    wait_for(lambda: len(api.requests_for("services", watch=False)) == 2,
             what="relist after three failed re-watches")
    assert "resourceVersion" not in api.requests_for("services", watch=False)[1].params


def test_bookmark_moves_the_rv_so_a_quiet_watch_resumes_without_410(api, client_factory):
    kubeapi.cluster(api, services=1)
    c = client_factory(api.url)
    c.wait_synced()
    wait_for(lambda: api.watching("services"))
    for i in range(3):  # other kinds move the global RV; the services watch stays quiet
        api.put("pods", kubeapi.pod(f"p{i}", f"172.17.1.{i}"))
    api.bookmark("services")
    wait_for(lambda: c.state("Service").rv == str(api.rv), what="bookmark RV")
    api.compact()  # history before now is gone: only the bookmark's RV can still resume
    api.drop_watches("services")
    wait_for(lambda: len(api.requests_for("services", watch=True)) == 2 and
             api.watching("services"), what="re-watch")
    assert api.requests_for("services", watch=True)[1].params["resourceVersion"] == str(api.rv)
    assert len(api.requests_for("services", watch=False)) == 1  # no 410, no relist


@pytest.mark.parametrize("code", [404, 403])
def test_endpoints_only_cluster(client_factory, code):
    with KubeAPI() as api:
        api.set_status("endpointslices", code)
        kubeapi.cluster(api, services=1)
        api.put("endpoints", kubeapi.endpoints("svc0", ["172.17.0.50", "172.17.0.51"]))
        c = client_factory(api.url)
        c.wait_synced()
        assert c.state("EndpointSlice").kind.name == "Endpoints"
        svc = c.store.service("default", "svc0")
        assert [b.ip for b in c.store.backends(svc, svc.ports[0])] == \
            ["172.17.0.50", "172.17.0.51"]
        wait_for(lambda: api.watching("endpoints"))
        api.put("endpoints", kubeapi.endpoints("svc0", ["172.17.0.52"]))
        wait_for(lambda: [b.ip for b in c.store.backends(svc, svc.ports[0])] ==
                 ["172.17.0.52"], what="Endpoints update by watch")


def test_absent_istio_crds_are_feature_off_and_picked_up_later(client_factory):
    with KubeAPI(absent=kubeapi.ISTIO) as api:
        kubeapi.cluster(api, services=1)
        c = client_factory(api.url)
        c.wait_synced()  # absent CRDs never block readiness
        wait_for(lambda: c.state("DestinationRule").feature_off, what="feature off")
        assert "404" in c.source.view()["kinds"]["DestinationRule"]["featureOff"]
        for r in kubeapi.ISTIO:
            api.set_status(r, None)
        api.put("destinationrules", kubeapi.destination_rule("svc0"))
        wait_for(lambda: c.store.count("DestinationRule") == 1, what="CRD installed later")
        assert c.state("DestinationRule").feature_off == ""
        svc = c.store.service("default", "svc0")
        assert c.store.destination_rule_for(svc).meta.name == "svc0"


def test_malformed_objects_are_skipped_counted_and_last_good_kept(api, client_factory):
    kubeapi.cluster(api, services=2)
    api.put_raw("services", "default", "broken",
                {"metadata": {"name": "broken", "namespace": "default"},
                 "spec": {"ports": "not a list"}})
    before = counter("edgemesh_meta_bad_objects_total", "Service")
    c = client_factory(api.url)
    c.wait_synced()
    assert c.names() == {"svc0", "svc1"}
    assert counter("edgemesh_meta_bad_objects_total", "Service") == before + 1
    wait_for(lambda: api.watching("services"))
    good = c.store.service("default", "svc0")
    api.put_raw("services", "default", "svc0",
                {"metadata": {"name": "svc0", "namespace": "default"},
                 "spec": {"ports": [{"port": "eighty"}]}})
    api.put("services", kubeapi.service("marker", ip="10.96.9.9"))
    wait_for(lambda: "marker" in c.names())
    assert c.store.service("default", "svc0") == good  # the bad update kept the last good


def test_metaserver_mode_replays_and_relists_on_reconnect(client_factory):
    with KubeAPI(metaserver=True) as api:
        kubeapi.cluster(api, services=2)
        c = client_factory(api.url)
        c.wait_synced()
        pods_list = api.requests_for("secrets")  # not watched without the gateway
        assert pods_list == []
        wait_for(lambda: c.state("Service").replays, what="replay detected")
        lists = len(api.requests_for("services", watch=False))
        api.drop_watches("services")
        api.delete("services", "default", "svc1")  # a replay can never report this
        wait_for(lambda: c.names() == {"svc0"}, what="deletion seen through relist")
        assert len(api.requests_for("services", watch=False)) == lists + 1


def test_empty_metaserver_list_without_rv_watches_from_scratch(client_factory):
    with KubeAPI(metaserver=True) as api:
        api.put("namespaces", kubeapi.namespace("default"))
        c = client_factory(api.url)
        c.wait_synced()
        wait_for(lambda: api.watching("services"))
        assert "resourceVersion" not in api.requests_for("services", watch=True)[0].params
        api.put("services", kubeapi.service("late", ip="10.96.8.8"))
        wait_for(lambda: "late" in c.names())


def test_unreachable_api_is_not_ready_and_keeps_retrying(client_factory):
    api = KubeAPI().start()
    url = api.url
    api.stop()
    c = client_factory(url)
    wait_for(lambda: c.state("Service").failures >= 2, what="retries")
    problems = c.admin.not_ready()
    assert "apiserver" in problems and "refused" in problems["apiserver"]
    assert not c.store.synced


# ---- Secrets: per namespace, where Gateways need them (issue 8) -------------------------------

def _secrets(c: Client) -> set[str]:
    return {f"{o.meta.namespace}/{o.meta.name}" for o in c.store.list("Secret")}


def _secret_cluster(api: KubeAPI) -> None:
    kubeapi.cluster(api, services=1)
    for ns in ("shop", "blog", "plain", "third"):
        api.put("namespaces", kubeapi.namespace(ns))
        api.put("secrets", kubeapi.tls_secret(f"{ns}-cert", ns))
    api.put("gateways", kubeapi.gateway("shop-gw", "shop", credential="shop-cert"))
    api.put("gateways", kubeapi.gateway("blog-gw", "blog", credential="blog-cert"))
    api.put("gateways", kubeapi.gateway("plain-gw", "plain"))  # HTTP: no TLS credential


def test_secrets_are_watched_only_in_namespaces_of_gateways_with_credentials(
        api, client_factory):
    _secret_cluster(api)
    c = client_factory(api.url, secrets=True)
    c.wait_synced()
    wait_for(lambda: _secrets(c) == {"shop/shop-cert", "blog/blog-cert"},
             what="Secrets of both Gateways' namespaces")
    wait_for(lambda: api.watching_in("secrets", "shop") and api.watching_in("secrets", "blog"),
             what="a watch per namespace")
    api.put("secrets", kubeapi.tls_secret("rotated", "shop"))
    wait_for(lambda: "shop/rotated" in _secrets(c), what="a new Secret by watch")
    api.put("secrets", kubeapi.tls_secret("never", "third"))
    api.put("services", kubeapi.service("marker", ip="10.96.9.9"))
    wait_for(lambda: "marker" in c.names())
    assert {r.namespace for r in api.requests_for("secrets")} == {"shop", "blog"}
    assert api.requests_for("secrets", namespace="") == []  # never cluster-wide
    assert sorted(c.source.view()["secretNamespaces"]) == ["blog", "shop"]


def test_a_deleted_gateway_stops_its_secret_watch_and_drops_its_secrets(api, client_factory):
    _secret_cluster(api)
    c = client_factory(api.url, secrets=True)
    wait_for(lambda: _secrets(c) == {"shop/shop-cert", "blog/blog-cert"}, what="Secrets")
    wait_for(lambda: api.watching_in("secrets", "blog"), what="blog watched")
    api.delete("gateways", "blog", "blog-gw")
    wait_for(lambda: _secrets(c) == {"shop/shop-cert"}, what="blog's Secrets dropped")
    wait_for(lambda: not api.watching_in("secrets", "blog"), what="blog's watch stopped")
    blog_requests = len(api.requests_for("secrets", namespace="blog"))
    api.put("secrets", kubeapi.tls_secret("late", "blog"))
    # A Gateway losing its credential is the same as going away; one gaining one starts a watch.
    api.put("gateways", kubeapi.gateway("shop-gw", "shop"))
    api.put("gateways", kubeapi.gateway("plain-gw", "plain", credential="plain-cert"))
    wait_for(lambda: _secrets(c) == {"plain/plain-cert"}, what="watches follow the Gateways")
    assert not api.watching_in("secrets", "shop")
    assert len(api.requests_for("secrets", namespace="blog")) == blog_requests
    assert api.requests_for("secrets", namespace="third") == []
    assert api.requests_for("secrets", namespace="") == []


def test_a_namespace_without_a_secret_grant_is_reported_not_fatal(client_factory):
    with KubeAPI(granted={"secrets": {"shop"}}) as api:
        _secret_cluster(api)
        c = client_factory(api.url, secrets=True)
        c.wait_synced()  # Secrets never block readiness
        wait_for(lambda: "blog" in c.source.secret_states and
                 "403" in c.source.secret_states["blog"].feature_off, what="403 in blog")
        wait_for(lambda: _secrets(c) == {"shop/shop-cert"}, what="shop's Secrets")
        api.granted["secrets"].add("blog")  # the operator adds the RoleBinding
        wait_for(lambda: "blog/blog-cert" in _secrets(c), what="picked up once granted")
        assert api.requests_for("secrets", namespace="") == []


def test_only_gateways_that_select_this_gateway_count(api, client_factory):
    from edgemesh.agent import gateway_secret_namespaces
    _secret_cluster(api)
    api.put("gateways", kubeapi.gateway("other-gw", "third", credential="third-cert",
                                        selector={"app": "another-gateway"}))
    rule = gateway_secret_namespaces({"kubeedge": "edgemesh-gateway"})
    c = client_factory(api.url, secrets=True, secret_namespaces=rule)
    wait_for(lambda: _secrets(c) == {"shop/shop-cert", "blog/blog-cert"}, what="Secrets")
    api.put("gateways", kubeapi.gateway("mine", "plain", credential="plain-cert",
                                        selector={}))  # an empty selector selects every one
    wait_for(lambda: "plain/plain-cert" in _secrets(c), what="empty selector")
    assert api.requests_for("secrets", namespace="third") == []


# ---- connection settings ----------------------------------------------------------------------

def _kubeconfig(tmp_path, body: str) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(body)
    return str(path)


def test_kubeconfig_current_context_with_inline_ca_and_token(tmp_path):
    import base64
    ca = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode()
    path = _kubeconfig(tmp_path, f"""
apiVersion: v1
kind: Config
current-context: edge
contexts:
- name: other
  context: {{cluster: nope, user: nobody}}
- name: edge
  context: {{cluster: c1, user: u1}}
clusters:
- name: c1
  cluster: {{server: "https://10.0.0.1:6443/", certificate-authority-data: "{ca}"}}
users:
- name: u1
  user: {{token: abc}}
""")
    conn = connection_from_config(KubeAPIConfig(kubeConfig=path), in_cluster=True)
    assert conn.base_url == "https://10.0.0.1:6443"
    assert conn.headers()["Authorization"] == "Bearer abc"
    with open(conn.verify) as f:
        assert f.read().startswith("-----BEGIN CERTIFICATE")
    with_master = connection_from_config(KubeAPIConfig(kubeConfig=path,
                                                       master="http://127.0.0.1:8001"), False)
    assert with_master.base_url == "http://127.0.0.1:8001" and with_master.token == "abc"


@pytest.mark.parametrize("body,problem", [
    ("apiVersion: v1\nkind: Config\n", "no current-context"),
    ("current-context: x\ncontexts: []\n", "context 'x' not found"),
    ("current-context: x\ncontexts: [{name: x, context: {cluster: c}}]\nclusters: "
     "[{name: c, cluster: {}}]\n", "has no server"),
    ("current-context: x\ncontexts: [{name: x, context: {cluster: c}}]\nclusters: "
     "[{name: c, cluster: {server: 'https://a', certificate-authority: /nonexistent/ca}}]\n",
     "certificate-authority /nonexistent/ca does not exist"),
    ("[unclosed", "not valid YAML"),
])
def test_bad_kubeconfig_is_a_config_error_naming_the_key(tmp_path, body, problem):
    path = _kubeconfig(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        connection_from_config(KubeAPIConfig(kubeConfig=path), in_cluster=False)
    assert err.value.problems[0].startswith("kubeAPIConfig.kubeConfig: ")
    assert problem in err.value.problems[0]


def test_connection_precedence_master_in_cluster_metaserver(tmp_path, monkeypatch):
    assert connection_from_config(KubeAPIConfig(master="http://127.0.0.1:10550/"),
                                  True).base_url == "http://127.0.0.1:10550"
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    assert connection_from_config(KubeAPIConfig(), True).base_url == "https://[fd00::1]:443"
    meta = connection_from_config(KubeAPIConfig(), False)
    assert meta.base_url == "http://127.0.0.1:10550" and meta.cert is None
    secure = KubeAPIConfig()
    secure.metaServer.security.requireAuthorization = True
    conn = connection_from_config(secure, False)
    assert conn.base_url == "https://127.0.0.1:10550"
    assert conn.cert == ("/etc/edgemesh/metaserver/server.crt",
                         "/etc/edgemesh/metaserver/server.key")


def test_token_file_is_reread(tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("one\n")
    conn = Connection("https://x", token_file=str(token))
    assert conn.headers()["Authorization"] == "Bearer one"
    token.write_text("two\n")
    monkeypatch.setattr("edgemesh.meta.kubeconn.TOKEN_REREAD_SECONDS", 0.0)
    assert conn.headers()["Authorization"] == "Bearer two"


def test_backoff_grows_to_the_maximum_with_jitter(api):
    source = KubeSource(Store(), Connection(api.url), backoff_max=30.0)
    random.seed(1)
    delays = [source._backoff(n) for n in range(1, 10)]
    assert 0.4 <= delays[0] <= 0.8 and all(d <= 30.0 for d in delays)
    assert delays[-1] >= 15.0


def test_api_connections_keep_alive_so_a_silently_dead_watch_ends() -> None:
    # a watch only reads: with its NAT mapping gone it would wait 5-10 min (tests/chaos)
    import socket

    with KubeAPI() as api:
        kubeapi.cluster(api)
        session = Connection(base_url=api.url).session()
        with session.get(api.url + "/api/v1/services?watch=true&timeoutSeconds=5",
                         stream=True, timeout=10) as r:
            r.raw.read1(1)
            sock = r.raw._fp.fp.raw._sock  # http.client response → socket.SocketIO
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 15
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
