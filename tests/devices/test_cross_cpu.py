"""An aarch64 agent and an x86-64 agent on one LAN, each in its own network namespace with a
pod: each reaches the other's service by name and by ClusterIP through the tunnel, with its
own iptables interception. The aarch64 agent is the libc-independent build (``make
portable-arm64``), run under qemu-user on this machine's filesystem: its loader path is moved
to where the test put it, and the helpers it runs (``ip``, ``iptables``) are this machine's
x86-64 ones, which is also a check that they get the host's environment (issue 15, item 3)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests import netlab
from tests.devices.artifacts import portable_tree, require_cpu
from tests.e2e import meshlab
from tests.procs import Proc, wait_ready

pytestmark = [pytest.mark.devices, pytest.mark.netns, pytest.mark.slow]

NODES = {"x86": "192.168.77.2", "arm": "192.168.77.3"}
SERVER_IP = "192.168.77.10"
SERVER = f"{SERVER_IP}:{meshlab.SERVER_PORT}"
POD = "172.17.0.2"
ADMIN = "127.0.0.1:10557"
SERVICES = {"web-x": ("10.96.7.1", "x86"), "web-arm": ("10.96.7.2", "arm")}


def relocated(tree: str, where: str) -> str:
    """A copy of the portable tree at ``where`` whose executable's loader is found there."""
    shutil.copytree(tree, where, symlinks=True)
    exe = os.path.join(where, "usr/lib/edgemesh/edgemesh")
    loader = [n for n in os.listdir(os.path.join(where, "usr/lib/edgemesh/glibc"))
              if n.startswith("ld-")]
    subprocess.run(["patchelf", "--set-interpreter",
                    os.path.join(where, "usr/lib/edgemesh/glibc", loader[0]), exe], check=True)
    return exe


@pytest.fixture(scope="module")
def mesh(module_lab: tuple[netlab.Lab, str]):
    tree = portable_tree("arm64")
    require_cpu("arm64")
    if shutil.which("patchelf") is None:
        pytest.skip("patchelf not installed")
    lab, tmp = module_lab
    arm_exe = relocated(tree, os.path.join(tmp, "arm64"))
    lan = lab.switch("lan")
    ns = {n: lab.host(n, lan, f"{ip}/24") for n, ip in NODES.items()}
    srv = lab.host("srv", lan, f"{SERVER_IP}/24")
    docs = meshlab.nodes(NODES)
    for name, (ip, node) in SERVICES.items():
        docs += meshlab.service(name, ip, 80, 8000, node, POD, port_name="http")
        ns[node].run("ip", "addr", "add", f"{POD}/32", "dev", "lo")
        www = os.path.join(tmp, f"www-{node}")
        os.mkdir(www)
        meshlab.write(www, "index.html", f"hello from {node}")
        ns[node].popen(["python3", "-m", "http.server", "8000", "--bind", POD,
                        "--directory", www])
    os.mkdir(os.path.join(tmp, "manifests"))
    meshlab.write(tmp, "manifests/all.yaml", yaml.safe_dump_all(docs))
    psk = meshlab.write(tmp, "psk", "one key for both CPUs, cluster one")
    config = meshlab.write(tmp, "config.yaml", yaml.safe_dump({
        "modules": {"edgeDNS": {"enable": True, "listenAddress": "127.0.0.1",
                                "listenPort": 1053,
                                "cacheDNS": {"upstreamServers": ["127.0.0.1:9"]}},
                    "edgeTunnel": {"holePunching": False}}}))
    procs = [meshlab.server(srv, tmp, psk, "127.0.0.1:10558")]
    for node in NODES:
        args = ["agent", "--config", config, *meshlab.mesh_args(
            node, SERVER, psk, os.path.join(tmp, f"state-{node}"), ADMIN,
            [os.path.join(tmp, "manifests")])]
        env = {"EDGEMESH_BIN": arm_exe} if node == "arm" else {}
        with pytest.MonkeyPatch.context() as mp:  # Proc reads EDGEMESH_BIN when it starts
            for key, value in env.items():
                mp.setenv(key, value)
            procs.append(Proc(args, ns=ns[node]))
    try:
        for proc, node in zip(procs[1:], NODES, strict=True):
            wait_ready(proc, ADMIN, ns[node], timeout=120)
        yield ns, procs, arm_exe
    finally:
        for proc in procs:
            proc.stop()


def test_the_arm_agent_is_aarch64_under_qemu(mesh) -> None:
    _, procs, arm_exe = mesh
    header = subprocess.run(["readelf", "-h", arm_exe], capture_output=True, text=True).stdout
    assert "AArch64" in header
    # `ip netns exec` execs the agent: its process runs qemu's aarch64 interpreter
    assert "aarch64" in os.readlink(f"/proc/{procs[2].popen.pid}/exe")


@pytest.mark.parametrize(("client", "service", "node"), [
    ("arm", "web-x", "x86"), ("x86", "web-arm", "arm")])
def test_each_cpu_reaches_the_others_service_through_the_tunnel(
        mesh, client: str, service: str, node: str) -> None:
    ns, procs, _ = mesh
    name = f"{service}.default.svc.cluster.local"
    ip = ns[client].run("dig", "+short", "+time=5", "+tries=3", "-p", "1053", "@127.0.0.1",
                        name, timeout=60).stdout.strip()
    assert ip == SERVICES[service][0]
    body = ns[client].run("curl", "-sS", "--max-time", "60", f"http://{ip}/",
                          timeout=90).stdout
    assert body == f"hello from {node}"
    status = json.loads(ns[client].run(sys.executable, "-m", "edgemesh", "status", "--json",
                                       "--admin", ADMIN).stdout)
    peers = {p["node"]: p for p in status["peers"]}
    assert peers[node]["path"] in ("direct", "relayed"), peers
    for proc in procs:
        assert "Traceback" not in proc.log()
