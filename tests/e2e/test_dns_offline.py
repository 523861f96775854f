"""Issue 3's offline case end to end: an agent whose API server is gone when it starts
answers cluster names with ``dig`` from its metadata cache, and follows the API once it is back.

Loopback only (127.0.0.1): the API is tests/kubeapi.py, DNS listens on a free port, the proxy
and tunnel are off, so no root is needed.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest

from tests import kubeapi
from tests.kubeapi import KubeAPI
from tests.netlab import wait_for
from tests.procs import Proc, debug_view, free_port, wait_ready

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (dnsutils)")

CONFIG = """\
kubeAPIConfig:
  resyncBackoffMaxSeconds: 1.0
modules:
  edgeDNS:
    cacheDNS: {upstreamServers: ["127.0.0.1:9"]}
  edgeProxy: {enable: false}
  edgeTunnel: {enable: false}
"""


def dig(port: int, name: str, *extra: str) -> str:
    out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+time=2", "+tries=1",
                          *extra, name, "A"], capture_output=True, text=True, timeout=10)
    return out.stdout


def answers(port: int, name: str, *extra: str) -> list[str]:
    return dig(port, name, "+short", *extra).split()


def test_an_agent_started_offline_answers_from_its_cache(tmp_path) -> None:
    config = tmp_path / "edgemesh.yaml"
    config.write_text(CONFIG)
    state_dir = str(tmp_path / "state")
    admin = f"127.0.0.1:{free_port()}"
    dns_port = free_port()

    def agent(master: str) -> Proc:
        return Proc(["agent", "--config", str(config), "--master", master, "--state-dir",
                     state_dir, "--no-iptables", "--admin", admin, "--node-name", "edge-1",
                     "--dns-listen", f"127.0.0.1:{dns_port}"])

    api = KubeAPI().start()
    try:
        kubeapi.cluster(api, services=1)
        api.put("services", kubeapi.service("web", ip="10.96.0.80"))
        with agent(api.url) as online:
            wait_ready(online, admin)
            wait_for(lambda: answers(dns_port, "web.default.svc.cluster.local") ==
                     ["10.96.0.80"], timeout=15, what="the online answer")
            wait_for(lambda: debug_view(admin, "node")["synced"] and
                     (tmp_path / "state" / "metadata-cache.json").exists(), timeout=15,
                     what="the cache written")
        port = api.port
        api.stop()

        # The cloud is gone: the agent starts from its cache and still answers, TCP too.
        with agent(api.url) as offline:
            wait_ready(offline, admin)
            assert debug_view(admin, "node")["stale"]
            assert answers(dns_port, "web.default.svc.cluster.local") == ["10.96.0.80"]
            assert answers(dns_port, "web.default.svc.cluster.local", "+tcp") == ["10.96.0.80"]
            assert "status: NXDOMAIN" in dig(dns_port, "nope.default.svc.cluster.local")

            # The API returns with a change: the agent catches up and answers the new state.
            api = KubeAPI(port=port).start()
            kubeapi.cluster(api, services=1)
            api.put("services", kubeapi.service("web", ip="10.96.0.81"))
            wait_for(lambda: answers(dns_port, "web.default.svc.cluster.local") ==
                     ["10.96.0.81"], timeout=30, what="the answer after the API returned")
            wait_for(lambda: not debug_view(admin, "node")["stale"], timeout=15,
                     what="stale flag cleared")
    finally:
        api.stop()
