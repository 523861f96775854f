"""An agent carrying 5,000 Services exits cleanly on SIGTERM, its rules removed (issue 16).

The agent runs in a network namespace of its own with iptables, DNS and the proxy on, from a
manifests directory of 5,000 Services (one slice each). Once ready, it is sent SIGTERM: it must
exit 0 with no traceback, and leave no EDGEMESH chain in the namespace. No timing is asserted
beyond a generous limit that only a hang would exceed.
"""
from __future__ import annotations

import json
import os

import pytest

from tests import netlab
from tests.procs import Proc, free_port, wait_ready

pytestmark = pytest.mark.netns

N = 5000


def manifests(directory: str) -> None:
    by_ns: dict[int, list[dict]] = {}
    for i in range(N):
        ns, name = i % 50, f"s{i}"
        by_ns.setdefault(ns, []).extend([
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": name, "namespace": f"ns{ns}"},
             "spec": {"clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                      "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": f"{name}-0", "namespace": f"ns{ns}",
                          "labels": {"kubernetes.io/service-name": name}},
             "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
             "endpoints": [{"addresses": [f"10.160.{i // 250}.{i % 250 + 1}"]}]}])
    for ns, items in by_ns.items():
        with open(os.path.join(directory, f"ns{ns}.json"), "w", encoding="utf-8") as f:
            json.dump({"apiVersion": "v1", "kind": "List", "items": items}, f)


@pytest.fixture
def node(tmp_path):
    reason = netlab.can_run()
    if reason:
        pytest.skip(reason)
    with netlab.Lab() as lab:
        ns = lab.netns("scale")
        ns.run("ip", "link", "set", "lo", "up")
        yield ns, tmp_path


def test_sigterm_with_5000_services_exits_cleanly_and_removes_rules(node):
    ns, tmp = node
    mdir = tmp / "manifests"
    mdir.mkdir()
    manifests(str(mdir))
    config = tmp / "agent.yaml"
    config.write_text("modules: {edgeTunnel: {enable: false}}\n"
                      f"commonConfig: {{stateDir: {tmp}/state}}\n")
    admin = f"127.0.0.1:{free_port()}"
    with Proc(["agent", "--config", str(config), "--manifests", str(mdir), "--admin", admin,
               "--dns-listen", f"127.0.0.1:{free_port()}", "--node-name", "n1"], ns=ns) as p:
        wait_ready(p, admin, ns, timeout=180)
        assert "EDGEMESH" in ns.run("iptables-save", "-t", "nat").stdout
        code = p.stop(timeout=60)
        log = p.log()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert "EDGEMESH" not in ns.run("iptables-save", "-t", "nat").stdout
    # quiet at scale: no line per Service at the default verbosity from the metadata side
    assert sum("manifests applied" in line for line in log.splitlines()) == 1
