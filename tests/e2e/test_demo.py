"""`make run`'s demo world (examples/demo/world.py): `up` builds it and shows it working, the
facts it printed hold when checked independently afterwards (it keeps running), and `down`
leaves no namespace, process or resolv.conf behind.

The test's world uses its own namespace prefix and state directory, so a user's demo is never
touched.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests import netlab
from tests.procs import ROOT, edgemesh_argv

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PREFIX = "emdemot"
WEB_PODS = {"web-a2", "web-b1", "web-cloud"}


def world(command: str, state: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": ROOT, "EDGEMESH_DEMO_PREFIX": PREFIX,
           "EDGEMESH_DEMO_STATE": state}
    return subprocess.run([sys.executable, "-m", "examples.demo.world", command], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)


def inside(node: str, *argv: str) -> str:
    return netlab.sh("ip", "netns", "exec", f"{PREFIX}-{node}", *argv, timeout=60).stdout


def demo_namespaces() -> list[str]:
    return [line.split()[0] for line in netlab.sh("ip", "netns", "list").stdout.splitlines()
            if line.startswith(f"{PREFIX}-")]


def pod_of(answer: str) -> str:
    assert answer.startswith("hello from pod "), answer
    return answer.split()[3]


def test_demo_world_up_explore_down(tmp_path) -> None:
    reason = netlab.can_run() or next((f"needs {t}" for t in ("socat", "dig", "curl")
                                       if shutil.which(t) is None), "")
    if reason:
        pytest.skip(reason)
    state = str(tmp_path / "state")
    try:
        up = world("up", state)
        assert up.returncode == 0, up.stdout + up.stderr
        out = up.stdout
        # what the tour printed: every kind of traffic answered
        assert "web.demo.svc.cluster.local. 30\tIN\tA\t10.96.60.10" in out
        assert {line.split()[3] for line in out.splitlines()
                if line.startswith("hello from pod ")} >= WEB_PODS
        assert "\nhello over TCP\n" in out and "\nhello over UDP\n" in out
        assert "< ws-cloud echoes: there" in out
        # the Edge CNI: a StatefulSet Pod by name, and a Pod IP, across the NATs
        assert "db-0.db.demo.svc.cluster.local\n10.244.2.10\n" in out
        assert "\nhello from pod db-0 on node b1 (path /)\n" in out
        assert "\nhello from pod db-1 on node cloud (path /)\n" in out
        assert "make demo-down" in out

        # checked independently, after `up` has exited: the world keeps running
        assert inside("a1", "dig", "+short", "@169.254.96.16",
                      "udp-echo.demo.svc.cluster.local").split() == ["10.96.60.30"]
        assert inside("b1", "getent", "ahostsv4", "ws.demo").split()[:1] == ["10.96.60.40"]
        through_gateway = {pod_of(inside("outside", "curl", "-sS", "--max-time", "30",
                                         "http://198.18.0.30:8080/x")) for _ in range(6)}
        assert through_gateway == WEB_PODS  # round robin over the three Pods, across sites
        assert pod_of(inside("b1", "curl", "-sS", "--max-time", "30", "http://web.demo/")) \
            in WEB_PODS
        assert inside("a1", "dig", "+short", "@169.254.96.16",
                      "db-1.db.demo.svc.cluster.local").split() == ["10.244.3.10"]
        assert pod_of(inside("a1", "curl", "-sS", "--max-time", "30",
                             "http://10.244.2.10:8080/")) == "db-0"  # behind site B's NAT
        status = json.loads(inside("a1", "env", f"PYTHONPATH={ROOT}", *edgemesh_argv(),
                                   "status", "--json"))
        assert status["node"]["node"] == "a1" and status["node"]["synced"] is True
        paths = {p["node"]: p["path"] for p in status["peers"] if p.get("active")}
        assert paths["a2"] == "direct", status["peers"]  # same LAN
        assert paths["b1"] in ("punched", "relayed"), status["peers"]  # across two NATs
        assert {"a2", "b1", "cloud"} <= set(paths)

        with open(os.path.join(state, "pids"), encoding="utf-8") as f:
            pids = [int(line.split()[0]) for line in f if line.strip()]
        assert len(pids) == 14  # relay, 4 agents, gateway, 8 pods
        listed = world("status", state)
        assert listed.returncode == 0 and listed.stdout.count(f"({PREFIX}-") == 14, listed.stdout
    finally:
        down = world("down", state)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "removed 14 namespaces" in down.stdout
    assert demo_namespaces() == []
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]
    assert not [d for d in os.listdir("/etc/netns") if d.startswith(f"{PREFIX}-")] \
        if os.path.isdir("/etc/netns") else True
    again = world("down", state)
    assert again.returncode == 0 and "no demo world was up" in again.stdout
