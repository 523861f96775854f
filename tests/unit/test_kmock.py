"""The kube source against kmock 0.8 (PyPI, nolar/kmock): an independent second peer.

kmock is a scriptable Kubernetes mock on aiohttp, no apiserver emulator (docs/specs/watch.md K11):
it needs ``watch=true``, replays ADDED on every watch, gives objects no resourceVersion and
answers lists with the RV ``"..."``. So it checks what it can: parsing of real list and event
bodies from someone else's server, the replay handling, and — with scripted responses — the
ERROR 410 → relist and the EOF → re-watch paths. Resource-version semantics are tested against
tests/kubeapi.py instead.

kmock cannot serve ``/api/v1/namespaces`` (see KINDS), so the source watches a subset here.
Its aiohttp server runs in a real OS thread with its own asyncio loop (gevent's hub of that
thread drives the loop's selector); the test talks to it over HTTP like the agent does.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from gevent import monkey

from edgemesh.meta.kube import KubeSource
from edgemesh.meta.kubeconn import Connection
from edgemesh.meta.store import Store
from edgemesh.runtime.admin import Admin
from tests import kubeapi
from tests.netlab import wait_for

kmock = pytest.importorskip("kmock")
# kmock 0.8 answers 500 to GET /api/v1/namespaces (its path parser takes "namespaces" for a
# namespace prefix and fails), so Namespaces are left out against it.
KINDS = ("Service", "EndpointSlice", "Pod", "DestinationRule")
start_new_thread = monkey.get_original("_thread", "start_new_thread")


class KmockPeer:
    """kmock's KubernetesEmulator on 127.0.0.1 in a background OS thread."""

    def __init__(self, preload: Callable[[Any], None]) -> None:
        self.box: dict[str, Any] = {}
        start_new_thread(self._thread, (preload,))
        deadline = time.monotonic() + 15
        while "port" not in self.box:
            if "error" in self.box or time.monotonic() > deadline:
                raise RuntimeError(f"kmock did not start: {self.box.get('error')}")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.box['port']}"
        self.k = self.box["k"]
        self.http = requests.Session()
        self.http.trust_env = False

    def _thread(self, preload: Callable[[Any], None]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        async def main() -> None:
            async with kmock.KubernetesEmulator() as k, kmock.Server(k) as server:
                preload(k)
                self.box["stop"] = loop.create_future()
                self.box.update(k=k, loop=loop)
                self.box["port"] = server.port
                await self.box["stop"]
        try:
            loop.run_until_complete(main())
        except Exception as e:  # reported to the test, which fails on it
            self.box["error"] = e
        finally:
            loop.close()

    def in_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in kmock's loop thread (its DSL is not thread-safe)."""
        async def call() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self.box["loop"]).result(timeout=10)

    def post(self, path: str, obj: dict[str, Any]) -> None:
        self.http.post(self.url + path, json=obj, timeout=5).raise_for_status()

    def delete(self, path: str) -> None:
        self.http.delete(self.url + path, timeout=5).raise_for_status()

    def close(self) -> None:
        loop = self.box["loop"]
        loop.call_soon_threadsafe(lambda: self.box["stop"].done() or
                                  self.box["stop"].set_result(None))
        self.http.close()


def _preload(k: Any) -> None:
    k.resources["discovery.k8s.io/v1/endpointslices"] = {}
    for i in range(2):
        name = f"svc{i}"
        k.objects["v1/services", "default", name] = kubeapi.service(name, ip=f"10.96.0.{10 + i}")
        slice_ = kubeapi.endpoint_slice(name, [f"172.17.0.{10 + i}"])
        k.objects["discovery.k8s.io/v1/endpointslices", "default",
                  slice_["metadata"]["name"]] = slice_
        k.objects["v1/pods", "default", f"{name}-pod"] = kubeapi.pod(f"{name}-pod",
                                                                    f"172.17.0.{10 + i}")


@pytest.fixture
def peer():
    p = KmockPeer(_preload)
    yield p
    p.close()


@pytest.fixture
def make_client(peer):
    made: list[KubeSource] = []

    def make() -> KubeSource:
        source = KubeSource(Store(), Connection(peer.url), admin=Admin(), backoff_max=0.2,
                            optional_retry=0.2, only=KINDS)
        source.start()
        made.append(source)
        return source
    yield make
    for source in made:
        source.stop()


def _names(source: KubeSource) -> set[str]:
    return {s.meta.name for s in source.store.services()}


def _backends(source: KubeSource, name: str) -> list[str]:
    svc = source.store.service("default", name)
    return [b.ip for b in source.store.backends(svc, svc.ports[0])] if svc else []


def test_lists_and_watches_services_and_endpointslices(peer, make_client):
    client = make_client()
    wait_for(lambda: client.store.synced, timeout=10, what="sync from kmock")
    assert _names(client) == {"svc0", "svc1"}
    assert _backends(client, "svc1") == ["172.17.0.11"]
    assert client.states["EndpointSlice"].kind.name == "EndpointSlice"
    # Istio CRDs are not declared in kmock: 404 → feature off, not a readiness blocker
    wait_for(lambda: client.states["DestinationRule"].feature_off, what="istio feature off")
    assert client.admin.not_ready() == {}

    peer.post("/api/v1/namespaces/default/services", kubeapi.service("web", ip="10.96.0.80"))
    peer.post("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
              kubeapi.endpoint_slice("web", ["172.17.0.80", "172.17.0.81"]))
    wait_for(lambda: _backends(client, "web") == ["172.17.0.80", "172.17.0.81"],
             what="objects POSTed to kmock")
    peer.delete("/api/v1/namespaces/default/services/svc0")
    wait_for(lambda: _names(client) == {"svc1", "web"}, what="deletion by watch")
    assert client.states["Service"].replays  # kmock replays ADDED on every watch (K11)


def _one_shot_watch(peer: KmockPeer, events: tuple[dict[str, Any], ...]) -> dict[int, Any]:
    """Script the first services watch to get exactly ``events`` then EOF; returns the params
    of every services request kmock sees from now on, by request id (kmock may evaluate a
    criterion more than once per request; its own watches never end)."""
    seen: dict[int, dict[str, str]] = {}

    def first_watch(req: Any) -> bool:
        seen.setdefault(req.id, dict(req.params))
        watches = [i for i, p in seen.items() if p.get("watch") == "true"]
        return req.id == watches[0] if watches else False
    peer.in_loop(lambda: peer.k["get /api/v1/services", first_watch] << events)
    return seen


def test_scripted_error_410_relists_from_scratch(peer, make_client):
    expired = {"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version: 1 (2)", "reason": "Expired", "code": 410}}
    seen = _one_shot_watch(peer, (expired,))
    client = make_client()
    wait_for(lambda: client.store.synced, timeout=10, what="sync from kmock")
    wait_for(lambda: sum(p.get("watch") == "true" for p in seen.values()) >= 2, timeout=15,
             what="a second services watch")
    first_list, first_watch, relist = list(seen.values())[:3]
    assert first_list.get("resourceVersion") == "0" and "watch" not in first_list
    assert first_watch.get("resourceVersion") == "..."  # kmock's literal list RV (K11)
    assert "watch" not in relist and "resourceVersion" not in relist  # rv "" after 410
    peer.post("/api/v1/namespaces/default/services", kubeapi.service("y", ip="10.96.0.98"))
    wait_for(lambda: "y" in _names(client), what="watching again after the relist")


def test_scripted_eof_rewatches(peer, make_client):
    scripted = {"type": "ADDED", "object": {"kind": "Service", "apiVersion": "v1",
                                            **kubeapi.service("scripted", ip="10.96.0.96")}}
    seen = _one_shot_watch(peer, (scripted,))  # one event, then the stream ends (K6.1)
    client = make_client()
    wait_for(lambda: client.store.synced, timeout=10, what="sync from kmock")
    wait_for(lambda: "scripted" in _names(client), what="the scripted event")
    wait_for(lambda: sum(p.get("watch") == "true" for p in seen.values()) >= 2, timeout=15,
             what="a re-watch after the end of the stream")
    second_watch = [p for p in seen.values() if p.get("watch") == "true"][1]
    assert second_watch.get("resourceVersion") == "..."  # re-watch, not relist
    peer.post("/api/v1/namespaces/default/services", kubeapi.service("z", ip="10.96.0.97"))
    wait_for(lambda: "z" in _names(client), what="watching again after the EOF")
    assert client.states["Service"].failures == 0
