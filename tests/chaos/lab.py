"""The chaos lab: two NAT sites (``--random-fully`` masquerade: no hole punching, cross-site
traffic goes through the relay), a relay server and a cloud node on the "internet", the test
kube-apiserver (tests/kubeapi.py) as every agent's metadata source, pods on lo addresses, and a
traffic process on node a1 (tests/chaos/traffic.py) running real clients the whole time.

    inet 198.18.0.0/24: srv .10 (edgemesh server), c1 .20 (cloud agent + API bridge :6443)
    site a (router a-r, WAN .1 through tests/chaos/wire.py: delay/loss on demand):
        a1 192.168.10.2 (clients; agent under libfaketime), a2 .3 (pods)
    site b (router b-r, WAN .2): b1 192.168.20.2, b2 .3 (pods)

The API server runs in the test process on 127.0.0.1; two socat processes carry it into c1
through a Unix socket (a path is reachable from every network namespace).
"""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any

import yaml

from tests import kubeapi, netlab
from tests.e2e import meshlab
from tests.kubeapi import KubeAPI
from tests.procs import ROOT, Proc, free_port, wait_ready

POD = "172.17.0.2"
ADMIN = "127.0.0.1:10557"
SERVER_ADMIN = "127.0.0.1:10558"
SERVER_IP, CLOUD_IP = "198.18.0.10", "198.18.0.20"
SERVER = f"{SERVER_IP}:{meshlab.SERVER_PORT}"
MASTER = f"http://{CLOUD_IP}:6443"
NODES = {"a1": "192.168.10.2", "a2": "192.168.10.3", "b1": "192.168.20.2",
         "b2": "192.168.20.3", "c1": CLOUD_IP}
LISTENER_PORT = re.compile(
    r"(?<=169\.254\.96\.16:)\d+|(?<=--dport )\d+(?= -m conntrack)|(?<=--on-port )\d+")
FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
# which traffic flows cross which path (the names traffic.py writes)
RELAYED = ("http-relayed", "stream-relayed", "udp", "websocket")
DIRECT = ("http-lan", "stream-lan", "http-cloud", "dns")
FLOWS = RELAYED + DIRECT

UDP_ECHO = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 7007))
    while True:
        data, peer = s.recvfrom(65535); s.sendto(b"echo " + data, peer)
""")
WS_ECHO = textwrap.dedent("""
    import sys
    from websockets.sync.server import serve
    def echo(ws):
        for m in ws: ws.send("ws " + m)
    with serve(echo, sys.argv[1], 8765) as s: s.serve_forever()
""")


def service(name: str, ip: str, port: int, target: int, nodes: list[str], proto: str = "TCP",
            port_name: str = "tcp") -> tuple[dict[str, Any], dict[str, Any]]:
    """A Service and its EndpointSlice, one endpoint ``POD``:``target`` on each of ``nodes``."""
    svc = {"metadata": {"name": name, "namespace": "default"},
           "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                    "ports": [{"name": port_name, "port": port, "targetPort": target,
                               "protocol": proto}]}}
    eps = {"metadata": {"name": f"{name}-1", "namespace": "default",
                        "labels": {"kubernetes.io/service-name": name}},
           "addressType": "IPv4",
           "ports": [{"name": port_name, "port": target, "protocol": proto}],
           "endpoints": [{"addresses": [POD], "conditions": {"ready": True}, "nodeName": n}
                         for n in nodes]}
    return svc, eps


SERVICES = [service("web-b", "10.96.3.1", 80, 8000, ["b1", "b2"], port_name="http"),
            service("stream-b", "10.96.3.2", 80, 8080, ["b1"]),
            service("udp-b", "10.96.3.3", 7, 7007, ["b1"], "UDP", "udp"),
            service("ws-b", "10.96.3.4", 80, 8765, ["b1"], port_name="http-ws"),
            service("web-c", "10.96.3.5", 80, 8000, ["c1"], port_name="http"),
            service("web-a2", "10.96.3.6", 80, 8000, ["a2"], port_name="http"),
            service("stream-a2", "10.96.3.7", 80, 8080, ["a2"])]


@dataclass
class Snapshot:
    """What an agent holds: descriptors, resident memory, its namespace's iptables rules."""
    fds: int
    rss_kb: int
    rules: list[str]

    def duplicates(self) -> list[str]:
        return [r for r, n in collections.Counter(self.rules).items()
                if n > 1 and " -A " in r]


@dataclass
class Events:
    """The traffic process's records, read incrementally from its file."""
    path: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    offset: int = 0

    def read(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        self.rows += [json.loads(line) for line in data[:end].splitlines() if line]
        return self.rows

    def between(self, start: float, end: float) -> list[dict[str, Any]]:
        return [r for r in self.read() if start <= r["t"] <= end]


class ChaosLab:
    def __init__(self, lab: netlab.Lab, tmp: str) -> None:
        self.lab, self.tmp = lab, tmp
        self.inet = lab.switch("inet", "198.18.0.254/24")
        self.ns: dict[str, netlab.Netns] = {}
        self.ns["srv"] = lab.host("srv", self.inet, f"{SERVER_IP}/24")
        self.ns["c1"] = lab.host("c1", self.inet, f"{CLOUD_IP}/24")
        self.wire_control = os.path.join(tmp, "wire.json")
        self.impair(0, 0)
        self.routers = {"a": self.site_behind_wire("a", "198.18.0.1/24", "192.168.10.1/24"),
                        "b": lab.site("b", self.inet, wan="198.18.0.2/24", lan="192.168.20.1/24",
                                      nat="random-fully")}
        for n, ip in NODES.items():
            if n != "c1":
                site = self.routers[n[0]]
                self.ns[n] = lab.host(n, site.lan, f"{ip}/24", gw=site.lan_ip)
            self.ns[n].sysctl("net.ipv4.tcp_tw_reuse", "1")
            self.ns[n].run("ip", "addr", "add", f"{POD}/32", "dev", "lo")
        self.psk = meshlab.write(tmp, "psk", "correct horse battery staple, chaos lab")
        self.config = meshlab.write(tmp, "config.yaml", yaml.safe_dump({
            "modules": {"edgeDNS": {"enable": True, "listenAddress": "127.0.0.1",
                                    "listenPort": 1053,
                                    "cacheDNS": {"upstreamServers": ["127.0.0.1:9"]}}}}))
        self.clock_file = meshlab.write(tmp, "faketime", "+0\n")
        self.api = self.start_api()
        self.pods: dict[str, subprocess.Popen[bytes]] = {}
        self.start_pods()
        self.server = self.start_server()
        self.agents = {n: self.start_agent(n) for n in NODES}
        for n in NODES:
            wait_ready(self.agents[n], ADMIN, self.ns[n], timeout=60)
        self.events = Events(os.path.join(tmp, "traffic.jsonl"))
        open(self.events.path, "w").close()
        self.traffic = self.ns["a1"].popen(
            [sys.executable, "-m", "tests.chaos.traffic", self.events.path], cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT})

    # ---- building -----------------------------------------------------------------------------

    def site_behind_wire(self, name: str, wan: str, lan: str) -> netlab.Site:
        """Like ``Lab.site`` (random-fully, inbound dropped), its WAN leg a tap pair joined by
        tests/chaos/wire.py, so the link can be given delay and loss."""
        router = self.lab.netns(f"{name}-r")
        lan_switch = self.lab.switch(f"{name}-lan")
        tap = f"t{name}"
        router.run("ip", "tuntap", "add", "dev", "wan0", "mode", "tap")
        self.inet.ns.run("ip", "tuntap", "add", "dev", tap, "mode", "tap")
        self.inet.ns.run("ip", "link", "set", tap, "master", "br0", "up")
        router.run("ip", "link", "set", "wan0", "up")
        router.run("ip", "addr", "add", wan, "dev", "wan0")
        self.lab.plug(router, lan_switch, "lan0", lan)
        self.wire = router.popen([sys.executable, "-m", "tests.chaos.wire", router.name, "wan0",
                                  self.inet.ns.name, tap, self.wire_control], cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": ROOT})
        router.sysctl("net.ipv4.ip_forward", "1")
        lan_net = netlab._network(lan)
        router.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", lan_net, "-o", "wan0",
                   "-j", "MASQUERADE", "--random-fully")
        for chain in ("INPUT", "FORWARD"):
            router.run("iptables", "-A", chain, "-i", "wan0", "-m", "conntrack", "--ctstate",
                       "ESTABLISHED,RELATED", "-j", "ACCEPT")
            router.run("iptables", "-A", chain, "-i", "wan0", "-j", "DROP")
        netlab.wait_for(lambda: "NO-CARRIER" not in router.run("ip", "link", "show", "wan0")
                        .stdout, 20, 0.1, what="tests/chaos/wire.py attached to the taps")
        return netlab.Site(router=router, lan=lan_switch, wan_ip=wan.split("/")[0],
                           lan_ip=lan.split("/")[0])

    def impair(self, delay: float, loss: float) -> None:
        tmp = self.wire_control + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"delay": delay, "loss": loss}, f)
        os.replace(tmp, self.wire_control)

    def start_api(self) -> KubeAPI:
        api = KubeAPI(port=free_port()).start()
        api.put("namespaces", kubeapi.namespace("default"))
        for n, ip in NODES.items():
            api.put("nodes", {"metadata": {"name": n}, "status": {
                "addresses": [{"type": "InternalIP", "address": ip}]}})
        for svc, eps in SERVICES:
            api.put("services", svc)
            api.put("endpointslices", eps)
        sock = os.path.join(self.tmp, "kube.sock")
        # loopback only in this namespace; the other end is inside c1
        self.bridge = subprocess.Popen(["socat", f"UNIX-LISTEN:{sock},fork",
                                        f"TCP:127.0.0.1:{api.port}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ns["c1"].popen(["socat", f"TCP-LISTEN:6443,bind={CLOUD_IP},reuseaddr,fork",
                             f"UNIX-CONNECT:{sock}"])
        self.ns["c1"].wait_listening(f"{CLOUD_IP}:6443")
        return api

    def start_pods(self) -> None:
        for n in ("a2", "b1", "b2", "c1"):
            www = os.path.join(self.tmp, f"www-{n}")
            os.makedirs(www, exist_ok=True)
            meshlab.write(www, "index.html", f"hello from {n}")
            self.start_pod(n, "http", ["python3", "-m", "http.server", "8000", "--bind", POD,
                                       "--directory", www])
        for n in ("a2", "b1"):
            self.start_pod(n, "stream", ["socat", f"TCP-LISTEN:8080,bind={POD},reuseaddr,fork",
                                         "SYSTEM:cat"])
        self.start_pod("b1", "udp", ["python3", "-c", UDP_ECHO, POD])
        self.start_pod("b1", "ws", [sys.executable, "-c", WS_ECHO, POD])
        for n in ("a2", "b1", "b2", "c1"):
            self.ns[n].wait_listening(f"{POD}:8000")

    def start_pod(self, node: str, what: str, argv: list[str]) -> None:
        self.pods[f"{node}/{what}"] = self.ns[node].popen(argv)

    def start_server(self) -> Proc:
        proc = meshlab.server(self.ns["srv"], self.tmp, self.psk, SERVER_ADMIN)
        wait_ready(proc, SERVER_ADMIN, self.ns["srv"], timeout=30)
        return proc

    def start_agent(self, node: str) -> Proc:
        args = ["agent", "--config", self.config, "--master", MASTER, *meshlab.mesh_args(
            node, SERVER, self.psk, self.state_dir(node), ADMIN, [])]
        env = None
        if node == "a1":  # its clock is stepped by a test; monotonic time stays true
            env = {"LD_PRELOAD": FAKETIME_LIB, "FAKETIME_TIMESTAMP_FILE": self.clock_file,
                   "FAKETIME_CACHE_DURATION": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        return Proc(args, ns=self.ns[node], env=env)

    def state_dir(self, node: str) -> str:
        return os.path.join(self.tmp, f"state-{node}")

    def restart_agent(self, node: str, sig: int = signal.SIGKILL) -> None:
        old = self.agents[node]
        old.stop(sig)
        os.unlink(old.logfile.name)
        self.agents[node] = self.start_agent(node)
        wait_ready(self.agents[node], ADMIN, self.ns[node], timeout=60)

    # ---- measuring ----------------------------------------------------------------------------

    def snapshot(self, node: str) -> Snapshot:
        pid = self.agents[node].popen.pid
        with open(f"/proc/{pid}/status") as f:
            rss = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))  # type: ignore[union-attr]
        return Snapshot(fds=len(os.listdir(f"/proc/{pid}/fd")), rss_kb=rss,
                        rules=rules(self.ns[node]))

    def snapshots(self) -> dict[str, Snapshot]:
        return {n: self.snapshot(n) for n in NODES}

    def close(self) -> None:
        self.traffic.kill()
        for proc in [*self.agents.values(), self.server]:
            proc.stop()
            os.unlink(proc.logfile.name)
        self.api.stop()
        self.bridge.kill()
        self.bridge.wait()


def rules(ns: netlab.Netns) -> list[str]:
    """iptables-save of ``ns``, each line led by its table, without comments and counters,
    and with the transparent listeners' ports (new in each agent process) as ``PORT``."""
    out, table, lines = ns.run("iptables-save").stdout, "", []
    for line in out.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line and not line.startswith(("#", "COMMIT")):
            line = re.sub(r"\[\d+:\d+\]", "[0:0]", line)
            lines.append(f"{table} " + LISTENER_PORT.sub("PORT", line))
    return lines


