"""The quick start as a user runs it: an agent on the examples, `edgemesh status`, live edits.

The agent runs as a real process on loopback with the metadata spine only (DNS, proxy and
tunnel are switched off in a config file, so this tests what the files source, the store and
the admin endpoint show a user).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from tests.procs import ROOT, Proc, edgemesh_argv, free_port, http_get, wait_ready

SPINE_ONLY = """\
modules:
  edgeDNS: {enable: false}
  edgeProxy: {enable: false}
  edgeTunnel: {enable: false}
"""
KLOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")


def status(admin: str, *extra: str) -> str:
    proc = subprocess.run([*edgemesh_argv(), "status", "--admin", admin, *extra],
                          capture_output=True, text=True, timeout=30, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def endpoints_by_service(admin: str) -> dict[str, list[str]]:
    services = json.loads(http_get(f"http://{admin}/debug/services")[1])
    return {f"{s['namespace']}/{s['name']}": sorted(
        f"{e['ip']}:{e['port']}@{e['node']}" for p in s["ports"] for e in p["endpoints"])
        for s in services}


def wait_until(condition, timeout: float, what: str) -> float:
    """Seconds until ``condition()`` held (raises after ``timeout``)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


@pytest.fixture
def agent(tmp_path):
    examples = tmp_path / "examples"
    shutil.copytree(os.path.join(ROOT, "examples"), examples)
    config = tmp_path / "edgemesh.yaml"
    config.write_text(SPINE_ONLY)
    admin = f"127.0.0.1:{free_port()}"
    proc = Proc(["agent", "--config", str(config), "--manifests", str(examples / "hello"),
                 "--no-iptables", "--state-dir", str(tmp_path / "state"), "--admin", admin,
                 "--node-name", "edge-node-1"])
    try:
        wait_ready(proc, admin)
        yield proc, admin, examples / "hello"
    finally:
        proc.stop(signal.SIGKILL)
        os.unlink(proc.logfile.name)


def test_status_lists_the_example_services_with_endpoints(agent):
    proc, admin, _ = agent
    text = status(admin)
    lines = text.splitlines()
    assert lines[0].startswith("node edge-node-1 (agent, edgemesh ")
    rows = {line.split()[0]: line for line in lines if line.startswith("hello/")}
    assert set(rows) == {"hello/web", "hello/echo", "hello/telemetry", "hello/db", "hello/docs"}
    assert "10.96.10.10" in rows["hello/web"]
    assert "172.17.1.10:8080@edge-node-1, 172.17.2.10:8080@edge-node-2" in rows["hello/web"]
    assert "172.17.1.11" not in rows["hello/web"]  # the Pod that is not ready yet
    assert "172.17.1.20:7007@edge-node-1, 172.17.2.20:7007@edge-node-2" in rows["hello/echo"]
    assert "5005/UDP" in rows["hello/telemetry"] and "172.17.2.30:5005" in rows["hello/telemetry"]
    assert rows["hello/db"].split()[1] == "None"
    assert rows["hello/docs"].split()[1] == "kubernetes.io"

    data = json.loads(status(admin, "--json"))
    assert data["node"]["node"] == "edge-node-1" and data["node"]["synced"] is True
    web = next(s for s in data["services"] if s["name"] == "web")
    [port] = web["ports"]
    assert (port["port"], port["protocol"], port["app"]) == (80, "TCP", "http")
    assert [(e["ip"], e["port"], e["node"], e["local"]) for e in port["endpoints"]] == [
        ("172.17.1.10", 8080, "edge-node-1", True), ("172.17.2.10", 8080, "edge-node-2", False)]

    metrics = http_get(f"http://{admin}/metrics")[1].splitlines()
    assert 'edgemesh_store_objects{kind="Service"} 5' in metrics
    assert any(line.startswith("edgemesh_build_info{") and line.endswith(" 1")
               for line in metrics)
    log_lines = [line for line in proc.log().splitlines() if line.strip()]
    assert log_lines and all(KLOG_LINE.match(line) for line in log_lines), proc.log()


def test_edits_show_up_in_status_and_bad_edits_keep_the_last_good_state(agent):
    proc, admin, hello = agent
    echo = hello / "echo.yaml"
    echo.write_text(echo.read_text().replace("172.17.2.20", "172.17.2.21"))
    # the files source polls every second, so an edit lands within two seconds; the wait
    # allows for a loaded machine
    wait_until(lambda: "172.17.2.21:7007@edge-node-2" in endpoints_by_service(admin)["hello/echo"],
               10, "the edited endpoint")
    assert "172.17.2.21:7007@edge-node-2" in status(admin)

    web = hello / "web.yaml"
    (hello / "new.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: fresh, namespace: hello}\n"
        "spec:\n  clusterIP: 10.96.10.99\n  selector: {app: web}\n"
        "  ports: [{name: http, port: 8080, targetPort: http}]\n")
    web.write_text(web.read_text().replace("  podIP: 172.17.2.10", "  podIP: [broken"))
    wait_until(lambda: "hello/fresh" in endpoints_by_service(admin), 10, "the new service")
    wait_until(lambda: "web.yaml:doc#" in proc.log(), 10, "the bad document report")
    services = endpoints_by_service(admin)
    assert services["hello/web"] == ["172.17.1.10:8080@edge-node-1",
                                     "172.17.2.10:8080@edge-node-2"]  # last good state
    assert services["hello/fresh"] == ["172.17.1.10:8080@edge-node-1",
                                       "172.17.2.10:8080@edge-node-2"]
    bad = [line for line in http_get(f"http://{admin}/metrics")[1].splitlines()
           if line.startswith("edgemesh_meta_bad_documents_total ")]
    assert bad and float(bad[0].split()[1]) >= 1

    os.unlink(hello / "new.yaml")
    wait_until(lambda: "hello/fresh" not in endpoints_by_service(admin), 10, "the removal")


def test_sigterm_stops_cleanly(agent):
    proc, admin, _ = agent
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.popen.wait(timeout=10) == 0, proc.log()
    assert "stopping" in proc.log()
    with pytest.raises(OSError):
        http_get(f"http://{admin}/livez", timeout=1)


@pytest.mark.netns
def test_make_agent_in_a_namespace(lab, tmp_path):
    """`make agent`'s agent (every module on) in a namespace of its own: status lists the
    examples, DNS answers their names. A PSK file is passed because the tunnel needs one.
    (`make run` builds the demo world: tests/e2e/test_demo.py.)"""
    ns = lab.netns("quick")
    psk = tmp_path / "psk"
    psk.write_text("quickstart-test-psk-0123456789abcdef\n")
    proc = Proc(["agent", "--manifests", "examples/", "--no-iptables", "--state-dir",
                 str(tmp_path / "state"), "--dns-listen", "127.0.0.1:1053",
                 "--node-name", "edge-node-1", "--psk-file", str(psk)], ns=ns)
    with proc:
        wait_ready(proc, "127.0.0.1:10557", ns=ns)
        text = ns.run("env", f"PYTHONPATH={ROOT}", *edgemesh_argv(), "status").stdout
        rows = {line.split()[0]: line for line in text.splitlines() if "/" in line.split(" ")[0]}
        assert "172.17.1.10:8080@edge-node-1, 172.17.2.10:8080@edge-node-2" in rows["hello/web"]
        assert "172.17.1.30:8080@edge-node-1" in rows["lb/random"]
        assert "172.17.2.50:8080@edge-node-2" in rows["shop/storefront"]
        assert "172.17.21.10:8080@b1" in rows["demo/web"]  # examples/demo/manifests too
        answer = ns.run("dig", "+short", "@127.0.0.1", "-p", "1053",
                        "web.hello.svc.cluster.local").stdout.split()
        assert answer == ["10.96.10.10"]
        assert proc.stop(signal.SIGTERM) == 0, proc.log()
