"""Work per change scales with the change, not the cluster (issue 16): counted, never timed.

A change to one Service of 5,000 rebuilds that Service's DNS records only, writes only its
objects to the store, derives endpoints for no other Service, and leaves the other indexes'
entries alone; the files source hears of a change through inotify without polling.
"""
from __future__ import annotations

import json
import os

import gevent
import pytest

from edgemesh.dns.records import ZoneIndex
from edgemesh.dns.zone import T_A, T_PTR, resolve
from edgemesh.meta.files import FilesSource
from edgemesh.meta.inotify import Watcher
from edgemesh.meta.store import Store
from tests.netlab import wait_for

N = 5000
ZONE = "cluster.local"


def service(i: int, ip: str | None = None, selector: bool = False) -> dict:
    spec = {"clusterIP": ip or f"10.96.{i // 250}.{i % 250 + 1}",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    if selector:
        spec["selector"] = {"app": f"s{i}"}
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"s{i}", "namespace": f"ns{i % 50}"}, "spec": spec}


def endpoint_slice(i: int, ip: str | None = None) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"s{i}-0", "namespace": f"ns{i % 50}",
                         "labels": {"kubernetes.io/service-name": f"s{i}"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip or f"10.160.{i // 250}.{i % 250 + 1}"]}]}


def pod(i: int, ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"s{i}-pod", "namespace": f"ns{i % 50}",
                         "labels": {"app": f"s{i}"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                {"containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def write_json(path: str, docs: list[dict]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": docs}, f)
    os.rename(path + ".tmp", path)


@pytest.fixture
def cluster(tmp_path):
    """5,000 Services with a slice each (one file per namespace), plus one file for s0, and
    100 selector Services whose endpoints are derived from Pods."""
    by_ns: dict[int, list[dict]] = {}
    for i in range(1, N):
        by_ns.setdefault(i % 50, []).extend([service(i), endpoint_slice(i)])
    for j in range(100):
        i = N + j
        by_ns[i % 50].extend([service(i, ip=f"10.97.0.{j + 1}", selector=True),
                              pod(i, f"10.161.0.{j + 1}")])
    for ns, docs in by_ns.items():
        write_json(str(tmp_path / f"ns{ns}.json"), docs)
    write_json(str(tmp_path / "s0.json"), [service(0), endpoint_slice(0)])
    store = Store()
    source = FilesSource(store, [str(tmp_path)], use_inotify=False)
    source.poll()
    zone = ZoneIndex(ZONE, 30)
    zone.refresh(store, 1)
    return tmp_path, store, source, zone


def a_records(zone: ZoneIndex, name: str) -> list[str]:
    reply = resolve(zone.data, f"{name}.svc.{ZONE}".split("."), T_A)
    assert reply is not None
    return [str(rr.rdata) for rr in reply.answer]


def test_one_changed_service_of_5000_rebuilds_only_its_records(cluster):
    tmp_path, store, source, zone = cluster
    assert zone.rebuilt == N + 100 and a_records(zone, "s0.ns0") == ["10.96.0.1"]
    derived = source.merged.derivations
    revision = store.revision
    write_json(str(tmp_path / "s0.json"), [service(0, ip="10.96.250.1"),
                                           endpoint_slice(0, ip="10.160.250.1")])
    assert source.poll()
    changes = store.changes_since(revision)
    assert changes is not None and changes.services == {("ns0", "s0")}
    assert {k: len(v) for k, v in changes.keys.items()} == {"Service": 1, "EndpointSlice": 1}
    zone.refresh(store, 2)
    assert zone.rebuilt == N + 100 + 1  # one Service's records, once
    assert source.merged.derivations == derived  # no other Service's endpoints re-derived
    assert a_records(zone, "s0.ns0") == ["10.96.250.1"]
    assert a_records(zone, "s1.ns1") == ["10.96.0.2"]
    ptr = resolve(zone.data, "1.250.160.10.in-addr.arpa".split("."), T_PTR)
    assert ptr is not None and str(ptr.answer[0].rdata) == f"10-160-250-1.s0.ns0.svc.{ZONE}."
    assert resolve(zone.data, "1.0.160.10.in-addr.arpa".split("."), T_PTR) is None
    assert store.service_by_ip("10.96.0.1") is None
    assert store.service_by_ip("10.96.250.1").meta.name == "s0"


def test_a_pod_change_rederives_only_the_services_selecting_it(cluster):
    tmp_path, store, source, zone = cluster
    derived, rebuilt = source.merged.derivations, zone.rebuilt
    i = N + 7
    path = str(tmp_path / "extra-pod.json")
    moved = pod(i, "10.161.9.9")
    moved["metadata"]["name"] = "extra"
    write_json(path, [moved])
    assert source.poll()
    assert source.merged.derivations == derived + 1  # s5007 only, of 100 selector Services
    zone.refresh(store, 2)
    assert zone.rebuilt == rebuilt + 1
    svc = store.service(f"ns{i % 50}", f"s{i}")
    assert sorted(b.ip for b in store.backends(svc, svc.ports[0])) == \
        ["10.161.0.8", "10.161.9.9"]


def test_deleting_a_service_file_touches_that_service_only(cluster):
    tmp_path, store, source, zone = cluster
    rebuilt = zone.rebuilt
    os.unlink(tmp_path / "s0.json")
    assert source.poll()
    zone.refresh(store, 2)
    assert zone.rebuilt == rebuilt  # nothing to build for a Service that is gone
    assert ("ns0", "s0") not in zone.data.services and len(zone.data.services) == N + 99
    assert resolve(zone.data, f"s0.ns0.svc.{ZONE}".split("."), T_A).rcode == 3  # NXDOMAIN


def test_a_store_whose_journal_was_outrun_rebuilds_whole():
    store = Store()
    zone = ZoneIndex(ZONE, 30)
    from edgemesh.meta import models
    from edgemesh.meta.store import JOURNAL_SIZE
    zone.refresh(store, 1)
    for i in range(JOURNAL_SIZE + 10):
        store.upsert("Service", models.parse_service(service(i)), None)
    assert store.changes_since(zone.revision) is None
    zone.refresh(store, 2)
    assert len(zone.data.services) == JOURNAL_SIZE + 10


@pytest.mark.skipif(Watcher.open() is None, reason="no inotify here")
def test_files_source_hears_changes_through_inotify_without_polling(tmp_path):
    write_json(str(tmp_path / "a.json"), [service(1)])
    store = Store()
    source = FilesSource(store, [str(tmp_path)], poll_interval=3600)  # polling would never see it
    source.start()
    try:
        assert source.watching == "inotify"
        write_json(str(tmp_path / "b.json"), [service(2)])
        wait_for(lambda: gevent.sleep(0.01) or store.service("ns2", "s2") is not None,
                 timeout=5, what="s2 from an inotify wake-up")
        (tmp_path / "sub").mkdir()
        write_json(str(tmp_path / "sub" / "c.json"), [service(3)])
        wait_for(lambda: gevent.sleep(0.01) or store.service("ns3", "s3") is not None,
                 timeout=5, what="s3 in a new subdirectory")
        os.unlink(tmp_path / "a.json")
        wait_for(lambda: gevent.sleep(0.01) or store.service("ns1", "s1") is None,
                 timeout=5, what="s1 gone")
    finally:
        source.stop()


def test_files_source_polls_without_inotify(tmp_path):
    write_json(str(tmp_path / "a.json"), [service(1)])
    store = Store()
    source = FilesSource(store, [str(tmp_path)], poll_interval=0.05, use_inotify=False)
    source.start()
    try:
        assert source.watching == "polling"
        write_json(str(tmp_path / "b.json"), [service(2)])
        wait_for(lambda: gevent.sleep(0.01) or store.service("ns2", "s2") is not None,
                 timeout=5, what="s2 from a poll")
    finally:
        source.stop()
