"""The proxy with 5,000 Services (issue 16): one socket per protocol and family, a change
written as only its own rules, one log line per sync, a clean and quick SIGTERM.

A real agent with iptables in a namespace, fed 5,000 Services x 5 endpoints (and a UDP one)
from a manifests directory. Nothing is timed in absolute terms: the stop time is compared
with the same agent's stop time at 50 Services.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
import yaml

from tests import netlab
from tests.procs import Proc, wait_ready

pytestmark = pytest.mark.netns

ADMIN = "127.0.0.1:10563"
CONFIG = {"modules": {"edgeDNS": {"enable": False}, "edgeTunnel": {"enable": False},
                      "edgeProxy": {"iptablesSyncPeriod": 600}},
          "commonConfig": {"stateDir": "/tmp/edgemesh-proxy-scale-state"}}


def _service(i: int, protocol: str = "TCP") -> list[dict]:
    ns, name = f"ns{i % 50}", f"svc{i}"
    port = {"name": protocol.lower(), "port": 80, "targetPort": 8080, "protocol": protocol}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
           "spec": {"clusterIP": f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256 or 1}",
                    "ports": [port]}}
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": f"{name}-1", "namespace": ns,
                        "labels": {"kubernetes.io/service-name": name}},
           "addressType": "IPv4",
           "ports": [{"name": protocol.lower(), "port": 8080, "protocol": protocol}],
           "endpoints": [{"addresses": [f"172.16.{i % 250}.{k + 1}"]} for k in range(5)]}
    return [svc, eps]


def _agent(lab: netlab.Lab, tmp: str, n: int) -> tuple[Proc, netlab.Netns, str]:
    node = lab.netns(f"n{n}")
    mdir = os.path.join(tmp, f"manifests{n}")
    os.mkdir(mdir)
    with open(os.path.join(mdir, "all.yaml"), "w") as f:
        yaml.safe_dump_all([doc for i in range(1, n) for doc in _service(i)]
                           + _service(n, "UDP"), f)
    config = os.path.join(tmp, "config.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(CONFIG, f)
    proc = Proc(["agent", "--config", config, "--manifests", mdir, "--node-name", "node",
                 "--admin", ADMIN], ns=node)
    wait_ready(proc, ADMIN, node, timeout=60)
    netlab.wait_for(lambda: "[+] proxy ok" in node.run(
        "curl", "-s", f"http://{ADMIN}/readyz").stdout, timeout=60, what="proxy ready")
    return proc, node, mdir


def _sample(node: netlab.Netns, name: str) -> float:
    text = node.run("curl", "-s", f"http://{ADMIN}/metrics").stdout
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _stop_seconds(proc: Proc) -> float:
    started = time.monotonic()
    code = proc.stop(signal.SIGTERM, timeout=30)
    assert code == 0, proc.log()[-2000:]
    return time.monotonic() - started


def test_5000_services_one_socket_each_way_quiet_incremental_clean_exit(
        module_lab: tuple[netlab.Lab, str]) -> None:
    lab, tmp = module_lab
    small, _, _ = _agent(lab, tmp, 50)
    small_stop = _stop_seconds(small)
    proc, node, mdir = _agent(lab, tmp, 5000)
    pid = proc.popen.pid  # ip netns exec execs the agent: the same process
    sockets = [fd for fd in os.listdir(f"/proc/{pid}/fd")
               if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")]
    assert len(sockets) < 20, len(sockets)  # not one per service port
    view = json.loads(node.run("curl", "-s", f"http://{ADMIN}/debug/proxy").stdout)
    assert len(view["listeners"]) == 5000 and set(view["transparent"]) == {"tcp/IPv4",
                                                                            "udp/IPv4"}
    assert {lst["listen"] for lst in view["listeners"]} == set(view["transparent"].values())
    # quiet: one summary line for the first sync, no line per port
    log = proc.log()
    assert log.count("carrying 5000 service ports, 5000 added, 0 removed") == 1, log[-2000:]
    assert len(log.splitlines()) < 30, log[-3000:]

    # one Service more: its one rule, nothing else rewritten
    before = _sample(node, "edgemesh_proxy_iptables_rule_operations_total")
    with open(os.path.join(mdir, "new.yaml"), "w") as f:
        yaml.safe_dump_all(_service(5001), f)
    netlab.wait_for(lambda: "-d 10.96.19.137/32 " in node.run(
        "iptables", "-t", "nat", "-S", "EDGEMESH-SERVICES").stdout, timeout=30,
        what="the new service's rule")
    netlab.wait_for(lambda: "carrying 5001 service ports, 1 added, 0 removed" in proc.log(),
                    timeout=10, what="the sync's summary line")
    assert _sample(node, "edgemesh_proxy_iptables_rule_operations_total") - before == 1

    # SIGTERM: exits 0, every rule and routing entry gone, not much slower than at 50
    stop = _stop_seconds(proc)
    for table in ("nat", "mangle", "filter"):
        assert "EDGEMESH" not in node.run("iptables-save", "-t", table).stdout
    assert "0x2000" not in node.run("ip", "rule").stdout
    assert stop < 4 * small_stop + 0.5, (stop, small_stop)
