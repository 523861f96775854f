"""A real ``edgemesh agent --master`` process against tests/kubeapi.py on loopback: it reflects
the cluster, keeps a cache, restarts while the API is down serving that cache (ready, with a
note in /readyz), and catches up when the API returns.

Only the metadata path runs: the config disables DNS, proxy, tunnel and gateway, so the test
needs no root and touches no network but 127.0.0.1.
"""
from __future__ import annotations

import json
import os

import pytest

from tests import kubeapi
from tests.kubeapi import KubeAPI
from tests.netlab import wait_for
from tests.procs import Proc, debug_view, free_port, http_get, wait_ready

CONFIG = """\
kubeAPIConfig:
  resyncBackoffMaxSeconds: 1.0
modules:
  edgeDNS: {enable: false}
  edgeProxy: {enable: false}
  edgeTunnel: {enable: false}
  edgeGateway: {enable: false}
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "edgemesh.yaml"
    path.write_text(CONFIG)
    return str(path)


def _agent(master: str, state_dir: str, admin: str, config_file: str) -> Proc:
    return Proc(["agent", "--config", config_file, "--master", master, "--state-dir", state_dir,
                 "--no-iptables", "--admin", admin, "--node-name", "edge-1"])


def _services(admin: str) -> dict[str, list[str]]:
    """name → endpoint IPs of its first port, from /debug/services."""
    return {s["name"]: [e["ip"] for e in s["ports"][0]["endpoints"]] if s["ports"] else []
            for s in debug_view(admin, "services")}


def test_agent_follows_the_api_and_restarts_from_its_cache(tmp_path, config_file):
    state_dir = str(tmp_path / "state")
    admin = f"127.0.0.1:{free_port()}"
    cache_file = os.path.join(state_dir, "metadata-cache.json")
    api = KubeAPI().start()
    try:
        kubeapi.cluster(api, services=2)
        with _agent(api.url, state_dir, admin, config_file) as agent:
            wait_ready(agent, admin)
            assert _services(admin) == {"svc0": ["172.17.0.10"], "svc1": ["172.17.0.11"]}
            api.put("services", kubeapi.service("web", ip="10.96.0.80"))
            api.put("endpointslices", kubeapi.endpoint_slice("web", ["172.17.0.80"]))
            api.put("endpointslices", kubeapi.endpoint_slice("svc0", ["172.17.0.20"]))
            api.delete("services", "default", "svc1")
            want = {"svc0": ["172.17.0.20"], "web": ["172.17.0.80"]}
            wait_for(lambda: _services(admin) == want, timeout=15, what="changes by watch")
            wait_for(lambda: {d["metadata"]["name"] for d in json.load(
                open(cache_file))["kinds"]["Service"]} == {"svc0", "web"}, timeout=15,
                what="cache written")
            assert oct(os.stat(cache_file).st_mode & 0o777) == "0o600"
        api.stop()

        with _agent(api.url, state_dir, admin, config_file) as agent:
            wait_ready(agent, admin)  # ready: it serves the cached state
            status, body = http_get(f"http://{admin}/readyz")
            assert status == 200 and "serving cached metadata: API unreachable since" in body
            assert _services(admin) == want
            assert debug_view(admin, "node")["stale"]
            assert "serving cached metadata" in agent.log()
            meta = debug_view(admin, "meta")
            assert meta["kinds"]["Service"]["lastError"]

            api.put("services", kubeapi.service("late", ip="10.96.0.90"))  # while away
            api.start()  # same port: the API is back
            wait_for(lambda: "late" in _services(admin), timeout=20, what="catch-up")
            wait_for(lambda: "cached" not in http_get(f"http://{admin}/readyz")[1],
                     what="stale note cleared")
            assert not debug_view(admin, "node")["stale"]
            assert "answers again" in agent.log()
    finally:
        api.stop()


def test_unreachable_api_without_cache_is_not_ready_and_retries(tmp_path, config_file):
    admin = f"127.0.0.1:{free_port()}"
    closed = KubeAPI().start()
    url = closed.url
    closed.stop()  # nobody listens there now
    with _agent(url, str(tmp_path / "state"), admin, config_file) as agent:
        wait_for(lambda: http_get(f"http://{admin}/readyz")[0] == 503, timeout=15,
                 what="admin up")
        # the first list may still be in flight ("listing ..."): its failure shows up next
        status, body = wait_for(lambda: (lambda r: r if "refused" in r[1] else None)(
            http_get(f"http://{admin}/readyz")), timeout=15, what="the refused list in readyz")
        assert status == 503 and "waiting for first sync" in body
        wait_for(lambda: "no usable metadata cache" in agent.log(), what="log line")
        wait_for(lambda: debug_view(admin, "meta")["kinds"]["Service"]["lastError"])
        assert agent.alive()
