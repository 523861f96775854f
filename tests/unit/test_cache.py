"""The metadata cache: atomic private writes, loading back, and a restart while the API is down."""
from __future__ import annotations

import json
import os
import stat

import pytest

from edgemesh.meta.cache import FILE_NAME, MetadataCache, write_atomic
from edgemesh.meta.kube import KubeSource
from edgemesh.meta.kubeconn import Connection
from edgemesh.meta.store import Store
from edgemesh.runtime import metrics
from edgemesh.runtime.admin import Admin
from tests import kubeapi
from tests.kubeapi import KubeAPI
from tests.netlab import wait_for


def _source(url: str, state_dir: str) -> tuple[KubeSource, Store, Admin]:
    store, admin = Store(), Admin()
    source = KubeSource(store, Connection(url), state_dir=state_dir, admin=admin,
                        backoff_max=0.2, optional_retry=0.2)
    source.cache.debounce = 0.05
    source.start()
    return source, store, admin


def test_write_atomic_is_private_and_replaces_whole(tmp_path):
    state = tmp_path / "state"
    path = str(state / FILE_NAME)
    write_atomic(path, b"one")
    write_atomic(path, b"two")
    assert open(path, "rb").read() == b"two"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert os.listdir(state) == [FILE_NAME]  # no temp files left behind


def test_nothing_is_written_before_the_first_sync(tmp_path):
    store = Store()
    cache = MetadataCache(store, str(tmp_path))
    from edgemesh.meta import models
    svc = {"metadata": {"name": "a", "namespace": "default"}, "spec": {"clusterIP": "10.0.0.1"}}
    store.upsert("Service", models.parse_service(svc), svc)
    assert not cache.write() and not os.path.exists(cache.path)
    store.mark_synced()
    assert cache.write()
    loaded = MetadataCache(Store(), str(tmp_path)).load()
    assert [obj.meta.name for obj, _ in loaded["Service"]] == ["a"]


@pytest.mark.parametrize("content", [b"{not json", b'{"version": 99, "kinds": {}}', b"[]"])
def test_a_corrupt_cache_is_reported_and_ignored(tmp_path, caplog, content):
    (tmp_path / FILE_NAME).write_bytes(content)
    assert MetadataCache(Store(), str(tmp_path)).load() is None
    assert "ignoring it" in caplog.text


def test_bad_documents_in_the_cache_are_skipped(tmp_path):
    good = kubeapi.service("good")
    doc = {"version": 1, "kinds": {"Service": [good, {"metadata": {"name": "bad"},
                                                       "spec": {"ports": 7}}],
                                   "Gadget": []}}
    (tmp_path / FILE_NAME).write_text(json.dumps(doc))
    state = MetadataCache(Store(), str(tmp_path)).load()
    assert [o.meta.name for o, _ in state["Service"]] == ["good"] and "Gadget" not in state


def test_restart_while_the_api_is_down_serves_the_cache_then_catches_up(tmp_path):
    state_dir = str(tmp_path / "state")
    api = KubeAPI().start()
    try:
        kubeapi.cluster(api, services=2)
        first, store, _ = _source(api.url, state_dir)
        wait_for(lambda: store.synced, what="first sync")
        cache_file = os.path.join(state_dir, FILE_NAME)
        wait_for(lambda: os.path.exists(cache_file), what="cache written")
        writes = metrics.REGISTRY.get("edgemesh_meta_cache_writes_total").value
        wait_for(lambda: json.load(open(cache_file))["kinds"].get("Namespace"))
        first.stop()
        api.stop()

        second, store, admin = _source(api.url, state_dir)
        wait_for(lambda: store.synced, what="sync from the cache")
        assert store.stale_reason.startswith("serving cached metadata: API unreachable since")
        assert {s.meta.name for s in store.services()} == {"svc0", "svc1"}
        svc = store.service("default", "svc1")
        assert [b.ip for b in store.backends(svc, svc.ports[0])] == ["172.17.0.11"]
        assert admin.not_ready() == {}  # ready: it can serve; the check's name says how
        assert any(line.startswith("[+] apiserver (serving cached metadata") for line in
                   admin.ready_lines())
        assert metrics.REGISTRY.get("edgemesh_meta_cache_loaded").value == 1
        assert metrics.REGISTRY.get("edgemesh_meta_cache_writes_total").value == writes

        api.delete("services", "default", "svc0")  # changes made while the agent was away
        api.put("services", kubeapi.service("svc2", ip="10.96.0.42"))
        api.start()  # same port: the API is back
        wait_for(lambda: not store.stale_reason, what="live again")
        assert {s.meta.name for s in store.services()} == {"svc1", "svc2"}
        assert "[+] apiserver ok" in admin.ready_lines()
        assert metrics.REGISTRY.get("edgemesh_meta_cache_loaded").value == 0
        wait_for(lambda: {d["metadata"]["name"] for d in
                          json.load(open(cache_file))["kinds"]["Service"]} == {"svc1", "svc2"},
                 what="cache rewritten with the live state")
        second.stop()
    finally:
        api.stop()


def test_api_down_and_no_cache_is_not_ready(tmp_path, caplog):
    api = KubeAPI().start()
    api.stop()
    source, store, admin = _source(api.url, str(tmp_path))
    try:
        wait_for(lambda: "apiserver" in admin.not_ready(), what="apiserver check failing")
        assert not store.synced
        wait_for(lambda: "no usable metadata cache" in caplog.text)
    finally:
        source.stop()
