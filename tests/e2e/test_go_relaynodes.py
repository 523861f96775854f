"""The Go EdgeMesh's relay setup, unchanged: the ConfigMap its Helm chart renders for the
install guide's ``--set agent.relayNodes[0].nodeName=k8s-master,...advertiseAddress={1.1.1.1}``
(tests/data/go_edgemesh/configs/v1.17.0/helm-edgemesh-agent-configmap-relaynodes.yaml) is the
``--config-file`` of three agents: ``k8s-master`` on the "internet" at 1.1.1.1, and one node in
each of two sites behind symmetric NATs that drop unsolicited inbound traffic. No ``servers``
anywhere: k8s-master must relay because the list names it, the others must use it because the
list names it, and curl on site A must reach a pod on site B through it.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import yaml

from tests import netlab
from tests.e2e import meshlab
from tests.procs import Proc, wait_ready

pytestmark = pytest.mark.netns

GO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                         "go_edgemesh", "configs", "v1.17.0",
                         "helm-edgemesh-agent-configmap-relaynodes.yaml")
ADMIN = "127.0.0.1:10557"
POD = "172.17.0.2"
NODES = {"k8s-master": "1.1.1.1", "edge-a": "192.168.10.2", "edge-b": "192.168.20.2"}


@pytest.fixture(scope="module")
def mesh(module_lab: tuple[netlab.Lab, str]):  # type: ignore[no-untyped-def]
    lab, tmp = module_lab
    inet = lab.switch("inet", "1.1.1.254/24")
    site_a = lab.site("a", inet, wan="1.1.1.2/24", lan="192.168.10.1/24", nat="random-fully")
    site_b = lab.site("b", inet, wan="1.1.1.3/24", lan="192.168.20.1/24", nat="random-fully")
    ns = {"k8s-master": lab.host("master", inet, "1.1.1.1/24"),
          "edge-a": lab.host("edge-a", site_a.lan, "192.168.10.2/24", gw="192.168.10.1"),
          "edge-b": lab.host("edge-b", site_b.lan, "192.168.20.2/24", gw="192.168.20.1")}
    ns["edge-b"].run("ip", "addr", "add", f"{POD}/32", "dev", "lo")
    www = os.path.join(tmp, "www")
    os.mkdir(www)
    meshlab.write(www, "index.html", "hello from edge-b")
    ns["edge-b"].popen(["python3", "-m", "http.server", "8000", "--bind", POD,
                        "--directory", www])
    mdir = os.path.join(tmp, "manifests")
    os.mkdir(mdir)
    meshlab.write(mdir, "all.yaml", yaml.safe_dump_all(
        meshlab.nodes(NODES) + meshlab.service("web-b", "10.96.1.1", 80, 8000, "edge-b", POD,
                                               port_name="http")))
    psk = meshlab.write(tmp, "psk", "the cluster psk, as the psk ConfigMap would mount it")
    procs = {n: Proc(["agent", "--config-file", GO_CONFIG, "--node-name", n, "--psk-file", psk,
                      "--state-dir", os.path.join(tmp, f"state-{n}"), "--admin", ADMIN,
                      "--manifests", mdir], ns=ns[n]) for n in NODES}
    try:
        for n in NODES:
            wait_ready(procs[n], ADMIN, ns[n], timeout=40)
        yield ns, procs
    finally:
        for p in procs.values():
            p.stop()


def test_the_go_relay_config_gives_a_relay_and_cross_site_traffic(mesh) -> None:  # type: ignore[no-untyped-def]
    ns, procs = mesh
    assert "relayNodes: this node relays, advertising 1.1.1.1; servers none" in \
        procs["k8s-master"].log()
    for n in ("edge-a", "edge-b"):
        assert "relayNodes: this node does not relay; servers 1.1.1.1:20006" in procs[n].log()
    out = ns["edge-a"].run("curl", "-sS", "--max-time", "30", "http://10.96.1.1/").stdout
    assert out == "hello from edge-b"
    status = json.loads(ns["edge-a"].run(sys.executable, "-m", "edgemesh", "status", "--json",
                                         "--admin", ADMIN).stdout)
    peers = {p["node"]: p for p in status["peers"]}
    assert peers["edge-b"]["path"] == "relayed", peers
    assert peers["edge-b"]["address"] == "via 1.1.1.1:20006", peers
    circuits = json.loads(ns["k8s-master"].run("curl", "-s", f"http://{ADMIN}/debug/relay")
                          .stdout)
    assert circuits, "k8s-master holds no relay records"
