"""The Go EdgeMesh's own example manifests (tests/data/go_edgemesh/examples, unchanged) applied
to a real ``edgemesh agent`` and ``edgemesh gateway``, checked with the clients its docs use:
curl, a TCP and a UDP client, a WebSocket client, and — for the HTTPS gateway of its
``docs/guide/edge-gateway.md`` — ``openssl req`` + a ``kubectl create secret tls`` Secret +
``curl -k --cert ./tls.crt --key ./tls.key https://GATEWAY:23333``.

Topology (one lab for the module):

    client 10.41.0.100 ── lan ── node  10.41.0.2: edge agent (iptables), edge Pods on its lo
                              ├─ cloud 10.41.0.3: cloud agent, Pods the examples keep off
                              │                   edge nodes (cloudzone.yaml)
                              └─ gw    10.41.0.1: gateway (Pod IPs routed via the edge node)
                                                  and the relay server the agents rendezvous at

``Cluster.apply`` does what a cluster does with ``kubectl apply -f FILE``, never touching the
files: namespace ``default`` where none is given, a ClusterIP for each Service, the Pods of each
Deployment (Running, Ready, downward-API env resolved; on ``cloud`` when its affinity keeps it
off ``node-role.kubernetes.io/edge`` nodes, else on the edge ``node``) and, in the Pod's
place, a stand-in process for its image on the Pod's IP: ``serve_hostname`` answers its Pod
name over HTTP (or UDP with ``--udp=true``), ``go-echo`` greets with the node, Pod, namespace
and IP and echoes lines, ``websocket_echo`` echoes messages, ``nginx`` serves its welcome page
on 80 and, with the example's client-certificate check, on 443. Each test applies its example
(a new generation of Pod IPs) and waits until the agent lists exactly those endpoints.
Statistical checks state their tolerance; nothing is timed.
"""
from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import yaml

from tests import netlab
from tests.e2e import meshlab
from tests.procs import ROOT, Proc, wait_ready

pytestmark = pytest.mark.netns

NODE, CLOUD, GW, CLIENT = "10.41.0.2", "10.41.0.3", "10.41.0.1", "10.41.0.100"
NODES = {"node": NODE, "cloud": CLOUD}
ADMIN = "127.0.0.1:10557"  # each agent's in its node's namespace, the gateway's in gw
SERVER_ADMIN = "127.0.0.1:10558"
EXAMPLES = os.path.join(ROOT, "tests", "data", "go_edgemesh", "examples")
PY = sys.executable
POD_NET = "172.17.0."

STAND_IN = r'''
import json, os, socket, ssl, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

pod = json.loads(sys.argv[1])
ip, name = pod["ip"], pod["name"]

def http(port, body, ctx=None):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a): pass
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    server = ThreadingHTTPServer((ip, port), H)
    if ctx is not None:
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()

def udp_hostname(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, port))
    while True:
        _, peer = s.recvfrom(65535)
        s.sendto(name.encode(), peer)

def go_echo(port, env):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port)); s.listen(64)
    welcome = ("Welcome, you are connected to node %s.\nRunning on Pod %s.\nIn namespace %s.\n"
               "With IP address %s.\nService %s.\n" % (env["NODE_NAME"], env["POD_NAME"],
               env["POD_NAMESPACE"], env["POD_IP"], env["SERVICE_ACCOUNT"])).encode()
    def one(c):
        with c:
            c.sendall(welcome)
            f = c.makefile("rb")
            for line in f:
                c.sendall(line)
    while True:
        c, _ = s.accept()
        threading.Thread(target=one, args=(c,), daemon=True).start()

def ws_echo(port):
    from websockets.sync.server import serve
    def echo(conn):
        for msg in conn:
            conn.send(msg)
    with serve(echo, ip, port) as server:
        server.serve_forever()

for kind, port, extra in pod["serve"]:
    if kind == "hostname-http":
        target, args = http, (port, name.encode())
    elif kind == "hostname-udp":
        target, args = udp_hostname, (port,)
    elif kind == "go-echo":
        target, args = go_echo, (port, extra)
    elif kind == "ws-echo":
        target, args = ws_echo, (port,)
    elif kind == "nginx-http":
        target, args = http, (port, extra.encode())
    else:  # nginx-https: ssl_verify_client on, with the Secret's rootCA.crt
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(extra["cert"], extra["key"])
        ctx.load_verify_locations(extra["ca"])
        ctx.verify_mode = ssl.CERT_REQUIRED
        target, args = http, (port, extra["body"].encode(), ctx)
    threading.Thread(target=target, args=args, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
'''

NGINX_PAGE = "<!DOCTYPE html>\n<html>\n<head>\n<title>Welcome to nginx!</title>\n</head>\n</html>\n"


def example(name: str) -> list[dict[str, Any]]:
    with open(os.path.join(EXAMPLES, name), encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


class Cluster:
    """What the API server, the Deployment controller and the kubelet would do with the
    manifests a user applies; see the module docstring."""

    def __init__(self, hosts: dict[str, netlab.Netns], mdir: str, tmp: str) -> None:
        self.hosts, self.mdir, self.tmp = hosts, mdir, tmp
        self.cluster_ips: dict[tuple[str, str], str] = {}
        self.next_pod = 2
        self.stand_ins: list[subprocess.Popen[bytes]] = []
        self.pods: dict[str, str] = {}  # pod name → IP, this generation
        self.addresses: list[tuple[str, str]] = []  # (node, Pod IP) on that node's lo
        self.volumes: dict[str, dict[str, str]] = {}  # secretName → key → file

    def apply(self, *docs: dict[str, Any]) -> dict[str, str]:
        """Replace the cluster's state by ``docs`` (plus what the cluster adds); the Pods made,
        name → IP."""
        self.clear()
        out: list[dict[str, Any]] = meshlab.nodes(NODES)
        for doc in docs:
            doc = json.loads(json.dumps(doc))
            if doc["kind"] != "Namespace":
                doc["metadata"].setdefault("namespace", "default")
            if doc["kind"] == "Service":
                key = (doc["metadata"]["namespace"], doc["metadata"]["name"])
                ip = self.cluster_ips.setdefault(key, f"10.96.41.{len(self.cluster_ips) + 10}")
                doc["spec"].setdefault("clusterIP", ip)
            if doc["kind"] == "Deployment":
                out += [self._pod(doc, i) for i in range(doc["spec"].get("replicas", 1))]
            elif doc["kind"] == "Pod":
                doc = self._running(doc, doc["metadata"]["name"])
            out.append(doc)
        with open(os.path.join(self.mdir, "cluster.yaml.tmp"), "w", encoding="utf-8") as f:
            yaml.safe_dump_all(out, f)
        os.replace(os.path.join(self.mdir, "cluster.yaml.tmp"),
                   os.path.join(self.mdir, "cluster.yaml"))
        return dict(self.pods)

    def clear(self) -> None:
        for p in self.stand_ins:
            p.kill()
            p.wait()
        self.stand_ins.clear()
        self.pods.clear()
        for node, ip in self.addresses:
            self.hosts[node].run("ip", "addr", "del", f"{ip}/32", "dev", "lo")
        self.addresses.clear()

    def _running(self, pod: dict[str, Any], name: str) -> dict[str, Any]:
        ip = f"{POD_NET}{self.next_pod}"
        self.next_pod += 1
        assert self.next_pod < 250
        node = pod["spec"]["nodeName"] = _schedule(pod)
        self.hosts[node].run("ip", "addr", "add", f"{ip}/32", "dev", "lo")
        self.addresses.append((node, ip))
        pod["status"] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                         "conditions": [{"type": "Ready", "status": "True"}]}
        self.pods[name] = ip
        return pod

    def _pod(self, deployment: dict[str, Any], i: int) -> dict[str, Any]:
        meta = deployment["metadata"]
        template = deployment["spec"]["template"]
        name = f"{meta['name']}-5c75d56dc4-{i}x{self.next_pod}"
        pod = self._running({"apiVersion": "v1", "kind": "Pod",
                             "metadata": {"name": name, "namespace": meta["namespace"],
                                          "labels": template["metadata"]["labels"]},
                             "spec": dict(template["spec"])}, name)
        serve = [s for c in pod["spec"]["containers"] for s in self._serve(pod, c)]
        if serve:
            proc = self.hosts[pod["spec"]["nodeName"]].popen([PY, "-c", STAND_IN, json.dumps(
                {"ip": pod["status"]["podIP"], "name": name, "serve": serve})],
                stdout=subprocess.PIPE)
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
            self.stand_ins.append(proc)
        return pod

    def _serve(self, pod: dict[str, Any], container: dict[str, Any]) -> list[Any]:
        """What the container's image does, as (kind, port, extra)."""
        image = container["image"].split(":")[0]
        ports = [p["containerPort"] for p in container.get("ports", [])]
        if image == "poorunga/serve_hostname":
            udp = "--udp=true" in container.get("command", [])
            return [("hostname-udp" if udp else "hostname-http", ports[0], None)]
        if image == "poorunga/go-echo":
            env = {e["name"]: e.get("value") or self._field(pod, e["valueFrom"]["fieldRef"])
                   for e in container["env"]}
            return [("go-echo", int(env["TCP_PORT"]), env)]
        if image == "poorunga/websocket_echo":
            return [("ws-echo", ports[0], None)]
        if image == "nginx":
            files = self.volumes["nginxsecret"]
            return [("nginx-http", 80, NGINX_PAGE),
                    ("nginx-https", 443, {"cert": files["nginx.crt"], "key": files["nginx.key"],
                                          "ca": files["rootCA.crt"], "body": NGINX_PAGE})]
        return []  # busybox / alpine: clients that sleep

    @staticmethod
    def _field(pod: dict[str, Any], ref: dict[str, str]) -> str:
        return {"spec.nodeName": pod["spec"]["nodeName"], "metadata.name":
                pod["metadata"]["name"], "metadata.namespace": pod["metadata"]["namespace"],
                "status.podIP": pod["status"]["podIP"],
                "spec.serviceAccountName": "default"}[ref["fieldPath"]]


def _schedule(pod: dict[str, Any]) -> str:
    """The node a Pod lands on: the examples pin cloud Pods with ``node-role.kubernetes.io/edge
    DoesNotExist`` and edge Pods with ``Exists`` (or not at all)."""
    terms = pod["spec"].get("affinity", {}).get("nodeAffinity", {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", [])
    off_edge = any(e["key"] == "node-role.kubernetes.io/edge" and e["operator"] == "DoesNotExist"
                   for t in terms for e in t.get("matchExpressions", []))
    return "cloud" if off_edge else "node"


class Env:
    def __init__(self, lab: netlab.Lab, tmp: str) -> None:
        lan = lab.switch("lan")
        self.node = lab.host("node", lan, f"{NODE}/24")
        self.cloud = lab.host("cloud", lan, f"{CLOUD}/24")
        self.gw = lab.host("gw", lan, f"{GW}/24")
        self.client = lab.host("client", lan, f"{CLIENT}/24")
        self.client.run("ip", "route", "add", "10.96.0.0/12", "via", NODE)
        self.gw.run("ip", "route", "add", f"{POD_NET}0/24", "via", NODE)
        self.tmp = tmp
        self.mdir = os.path.join(tmp, "manifests")
        os.mkdir(self.mdir)
        self.cluster = Cluster({"node": self.node, "cloud": self.cloud}, self.mdir, tmp)
        self.cluster.apply()
        psk = meshlab.write(tmp, "psk", "the Go examples' cluster, for these tests only")
        agent_cfg = meshlab.write(tmp, "agent.yaml", yaml.safe_dump({"modules": {
            "edgeDNS": {"enable": False}, "edgeTunnel": {"holePunching": False},
            "edgeProxy": {"iptablesSyncPeriod": 1.0}}}))
        gw_cfg = meshlab.write(tmp, "gateway.yaml", yaml.safe_dump({
            "kind": "EdgeMeshGateway", "modules": {
                "edgeTunnel": {"enable": False}, "edgeGateway": {"interfaceResync": 1.0}}}))
        self.server = meshlab.server(self.gw, tmp, psk, SERVER_ADMIN)
        self.agents = {name: Proc(["agent", "--config", agent_cfg, *meshlab.mesh_args(
            name, f"{GW}:{meshlab.SERVER_PORT}", psk, os.path.join(tmp, f"state-{name}"),
            ADMIN, [self.mdir])], ns=ns) for name, ns in (("node", self.node),
                                                          ("cloud", self.cloud))}
        self.agent = self.agents["node"]
        self.gateway = Proc(["gateway", "--config", gw_cfg, "--manifests", self.mdir,
                             "--nic", "eth0", "--node-name", "gw", "--admin", ADMIN,
                             "--state-dir", os.path.join(tmp, "state-gw")], ns=self.gw)
        wait_ready(self.agent, ADMIN, self.node, timeout=40)
        wait_ready(self.agents["cloud"], ADMIN, self.cloud, timeout=40)
        wait_ready(self.gateway, ADMIN, self.gw)

    def procs(self) -> list[Proc]:
        return [*self.agents.values(), self.gateway, self.server]

    # ---- applying ------------------------------------------------------------------------------

    def apply(self, *names: str, extra: tuple[dict[str, Any], ...] = ()) -> dict[str, str]:
        """``kubectl apply -f`` each example (and ``extra`` documents); waits until the agent
        serves every Service with exactly the new Pods behind it."""
        docs = [d for n in names for d in example(n)] + list(extra)
        pods = self.cluster.apply(*docs)
        services = [d for d in docs if d["kind"] == "Service"]

        def serving() -> bool:
            return all(serves(self.debug(node, "proxy")) for node in (self.node, self.cloud))

        def serves(view: dict[str, Any]) -> bool:
            for svc in services:
                ns = svc["metadata"].get("namespace", "default")
                want = {ip for pod, ip in pods.items()
                        if all(pod_labels(docs, pod).get(k) == v
                               for k, v in svc["spec"]["selector"].items())}
                got = [set(e.split(":")[0] for e in lis["endpoints"])
                       for lis in view["listeners"]
                       if lis["service"] == f"{ns}/{svc['metadata']['name']}"]
                if len(got) != len(svc["spec"]["ports"]) or any(g != want for g in got):
                    return False
            return True
        netlab.wait_for(serving, timeout=30, what=f"agent serving {names}")
        return pods

    def debug(self, ns: netlab.Netns, view: str) -> Any:
        return json.loads(ns.run("curl", "-sf", f"http://{ADMIN}/debug/{view}").stdout)

    def listener(self, service: str) -> dict[str, Any]:
        return next(lis for lis in self.debug(self.node, "proxy")["listeners"]
                    if lis["service"] == service)

    def ip(self, name: str, ns: str = "default") -> str:
        return self.cluster.cluster_ips[(ns, name)]

    # ---- clients -------------------------------------------------------------------------------

    def curl(self, *args: str, check: bool = True) -> str:
        return self.client.run("curl", "-sS", "--max-time", "10", *args, check=check).stdout

    def curls(self, url: str, n: int, *args: str) -> list[str]:
        """``n`` separate curl runs (new connections), their bodies in order."""
        script = f'for i in $(seq {n}); do curl -sS --max-time 10 {" ".join(args)} {url}; ' \
                 f'echo; done'
        return self.client.run("sh", "-c", script, timeout=120).stdout.split()

    def py(self, code: str, *args: str) -> str:
        return self.client.run(PY, "-c", textwrap.dedent(code), *args, timeout=60).stdout


def pod_labels(docs: list[dict[str, Any]], pod: str) -> dict[str, str]:
    for d in docs:
        if d["kind"] == "Deployment" and pod.startswith(d["metadata"]["name"] + "-5c75d56dc4-"):
            return d["spec"]["template"]["metadata"]["labels"]
        if d["kind"] == "Pod" and d["metadata"]["name"] == pod:
            return d["metadata"].get("labels", {})
    return {}


@pytest.fixture(scope="module")
def env(module_lab: tuple[netlab.Lab, str]):
    e = Env(*module_lab)
    try:
        yield e
    finally:
        e.cluster.clear()
        for proc in e.procs():
            log = proc.log()
            proc.stop()
            if os.environ.get("EDGEMESH_TEST_LOGS"):
                print(log)


# ---- the service proxy ------------------------------------------------------------------------

def test_hostname_http_from_the_test_pod(env: Env) -> None:
    """test-case.md "HTTP": ``curl hostname-svc:12345`` answers the Pod's name."""
    pods = env.apply("test-pod.yaml", "hostname.yaml")
    (name,) = [p for p in pods if p.startswith("hostname-edge-")]
    assert env.curl(f"http://{env.ip('hostname-svc')}:12345") == name


def test_hostname_udp(env: Env) -> None:
    """test-case.md "UDP": ``nc -u hostname-udp-svc 12345`` answers the Pod's name."""
    (name,) = env.apply("hostname-udp.yaml")
    out = env.py("""
        import socket, sys
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(10)
        s.connect((sys.argv[1], 12345))
        s.send(b"\\n")
        print(s.recv(100).decode())
    """, env.ip("hostname-udp-svc"))
    assert out.strip() == name


def test_tcp_echo(env: Env) -> None:
    """test-case.md "TCP": ``telnet tcp-echo-service 2701``: the greeting, then an echo."""
    ((pod, ip),) = env.apply("tcp-echo-service.yaml").items()
    out = env.py("""
        import socket, sys
        s = socket.create_connection((sys.argv[1], 2701), timeout=10)
        f = s.makefile("rb")
        lines = [f.readline().decode() for _ in range(5)]
        s.sendall(b"Hello Edge, I am Cloud.\\n")
        lines.append(f.readline().decode())
        print("".join(lines), end="")
    """, env.ip("tcp-echo-service"))
    assert out == (f"Welcome, you are connected to node node.\nRunning on Pod {pod}.\n"
                   f"In namespace default.\nWith IP address {ip}.\nService default.\n"
                   "Hello Edge, I am Cloud.\n")


def test_websocket(env: Env) -> None:
    """test-case.md "Websocket": ``./client --addr ws-svc:12348`` gets its messages back."""
    env.apply("test-pod.yaml", "websocket.yaml")
    out = env.py("""
        import sys
        from websockets.sync.client import connect
        with connect(f"ws://{sys.argv[1]}:12348/echo", open_timeout=10) as ws:
            for i in range(3):
                ws.send(f"tick {i}")
                print(ws.recv(timeout=10))
    """, env.ip("ws-svc"))
    assert out.split("\n")[:3] == ["tick 0", "tick 1", "tick 2"]


def test_cross_edge_cloud(env: Env) -> None:
    """test-case.md "Cross-Edge-Cloud": the busybox in cloudzone (on the cloud node) reaches
    tcp-echo-edge-svc.edgezone (on the edge node), and the edge's busybox the cloud's echo,
    each through the tunnel between the two agents."""
    pods = env.apply("cloudzone.yaml", "edgezone.yaml")
    for busybox, svc, ns, node in ((env.cloud, "tcp-echo-edge-svc", "edgezone", "node"),
                                   (env.node, "tcp-echo-cloud-svc", "cloudzone", "cloud")):
        out = busybox.run(PY, "-c", textwrap.dedent("""
            import socket, sys
            s = socket.create_connection((sys.argv[1], 2701), timeout=15)
            f = s.makefile("rb")
            lines = [f.readline().decode() for _ in range(5)]
            s.sendall(b"Hello, I am the other zone.\\n")
            print("".join(lines) + f.readline().decode(), end="")
        """), env.ip(svc, ns), timeout=60).stdout
        pod = next(p for p in pods if p.startswith(svc.removesuffix("-svc") + "-"))
        assert out.split("\n") == [
            f"Welcome, you are connected to node {node}.", f"Running on Pod {pod}.",
            f"In namespace {ns}.", f"With IP address {pods[pod]}.", "Service default.",
            "Hello, I am the other zone.", ""]


def test_nginx_https_with_client_certificates(env: Env) -> None:
    """test-case.md "HTTPS": tools.sh's certificates and Secret, then
    ``curl -k --cert client.crt --key client.key https://nginx-https``."""
    ca, certs = os.path.join(env.tmp, "ca"), os.path.join(env.tmp, "certs")
    os.makedirs(ca, exist_ok=True)
    os.makedirs(certs, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
            "-keyout", f"{ca}/rootCA.key", "-out", f"{ca}/rootCA.crt",
            "-subj", "/C=CN/ST=Zhejiang/L=Hangzhou/O=KubeEdge/CN=kubeedge.io")
    for who in ("nginx", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{certs}/{who}.key",
                "-out", f"{certs}/{who}.csr",
                "-subj", "/C=CN/ST=Zhejiang/L=Hangzhou/O=KubeEdge/CN=my-nginx.com")
        openssl("x509", "-req", "-in", f"{certs}/{who}.csr", "-CA", f"{ca}/rootCA.crt",
                "-CAkey", f"{ca}/rootCA.key", "-CAcreateserial", "-days", "365",
                "-out", f"{certs}/{who}.crt")
    env.cluster.volumes["nginxsecret"] = {"rootCA.crt": f"{ca}/rootCA.crt",
                                          "nginx.crt": f"{certs}/nginx.crt",
                                          "nginx.key": f"{certs}/nginx.key"}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "nginxsecret"},
              "stringData": {k: open(v, encoding="ascii").read()
                             for k, v in env.cluster.volumes["nginxsecret"].items()}}
    env.apply("nginx-https/nginx.yaml", extra=(secret,))
    url = f"https://{env.ip('nginx-https')}"
    page = env.curl("-k", "--cert", f"{certs}/client.crt", "--key", f"{certs}/client.key", url)
    assert "<title>Welcome to nginx!</title>" in page
    assert "Welcome to nginx!" in env.curl(f"http://{env.ip('nginx-https')}")
    # the client certificate really is checked end to end (the proxy only passes TLS through)
    assert env.client.run("curl", "-sS", "--max-time", "10", "-k", url,
                          check=False).returncode != 0


# ---- load balancing ---------------------------------------------------------------------------

def _not_a_rotation(seq: list[str], n: int) -> bool:
    return any(seq[i] != seq[i + n] for i in range(len(seq) - n))


def test_lb_random_by_the_rules_name(env: Env) -> None:
    """hostname-lb-random.yaml: its DestinationRule's host is the Deployment's name, its name
    the Service's — the Go EdgeMesh's matching — so the Service is balanced at RANDOM."""
    pods = env.apply("hostname-lb-random.yaml")
    svc = env.listener("default/hostname-lb-svc")
    assert (svc["policy"], svc["destinationRule"], svc["destinationRuleMatchedBy"]) == \
        ("RANDOM", "default/hostname-lb-svc", "name")
    seen = env.curls(f"http://{env.ip('hostname-lb-svc')}:12345", 45)
    assert len(seen) == 45 and set(seen) == set(pods)  # P(a pod unseen) < 3 * (2/3)^45
    assert _not_a_rotation(seen, 3)  # round robin would repeat with period 3
    assert env.agent.log().count("applies to Service default/hostname-lb-svc by its name") == 1


def test_lb_round_robin_by_host(env: Env) -> None:
    pods = env.apply("hostname-lb-roundrobin.yaml")
    svc = env.listener("default/hostname-lb-svc")
    assert (svc["policy"], svc["destinationRuleMatchedBy"]) == ("ROUND_ROBIN", "host")
    seen = env.curls(f"http://{env.ip('hostname-lb-svc')}:12345", 30)
    assert sorted(seen.count(p) for p in pods) == [10, 10, 10]


def test_lb_default_policy_without_a_rule(env: Env) -> None:
    pods = env.apply("hostname-lb-default.yaml")
    svc = env.listener("default/hostname-lb-svc")
    assert (svc["policy"], svc["destinationRule"]) == ("ROUND_ROBIN", None)
    assert set(env.curls(f"http://{env.ip('hostname-lb-svc')}:12345", 6)) == set(pods)


def test_lb_consistent_hash_on_user_agent(env: Env) -> None:
    env.apply("hostname-lb-consistenthash.yaml")
    svc = env.listener("default/hostname-lb-svc")
    assert (svc["policy"], svc["hashKey"]) == ("CONSISTENT_HASH", "httpHeaderName")
    url = f"http://{env.ip('hostname-lb-svc')}:12345"
    assert len(set(env.curls(url, 8, "-A", "edge-client/1"))) == 1
    spread = {env.curl("-A", f"agent-{i}", url) for i in range(24)}
    assert len(spread) >= 2  # 24 user agents on one pod of three: P < 3 * 3^-24


# ---- the gateway ------------------------------------------------------------------------------

def _gateway_answers(env: Env, pods: dict[str, str], *args: str, hosts: str = "*") -> None:
    """Wait until the gateway has the example's server (by its hosts) and answers from the
    example's Pods."""
    netlab.wait_for(lambda: [s["hosts"] for s in env.debug(env.gw, "gateway")["ports"].get(
        "23333", {}).get("servers", [])] == [[hosts]], timeout=30, what="the new Gateway")
    netlab.wait_for(lambda: env.client.run("curl", "-s", "--max-time", "5", *args,
                                           check=False).stdout in pods,
                    timeout=30, what="the gateway answering from the new Pods")


def test_gateway_http(env: Env) -> None:
    """hostname-lb-random-gateway.yaml: port 23333 routes everything to the Service, which the
    gateway balances at RANDOM too (its rule matched by name)."""
    pods = env.apply("hostname-lb-random-gateway.yaml")
    url = f"http://{GW}:23333/"
    _gateway_answers(env, pods, url)
    seen = env.curls(url, 30)
    assert set(seen) == set(pods) and _not_a_rotation(seen, 3)
    assert "applies to Service default/hostname-lb-svc by its name" in env.gateway.log()


def test_gateway_route_by_host_and_path(env: Env) -> None:
    """hostname-lb-random-gateway-route.yaml: only Host hostname.org, path /who*."""
    pods = env.apply("hostname-lb-random-gateway-route.yaml")
    _gateway_answers(env, pods, "-H", "Host: hostname.org", f"http://{GW}:23333/who",
                     hosts="hostname.org")
    code = ["-o", "/dev/null", "-w", "%{http_code}"]
    assert env.curl(*code, "-H", "Host: hostname.org", f"http://{GW}:23333/", check=False) \
        == "404"
    assert env.curl(*code, "-H", "Host: example.org", f"http://{GW}:23333/who",
                    check=False) == "404"


def test_gateway_https_as_the_go_readme_documents_it(env: Env) -> None:
    """docs/guide/edge-gateway.md "HTTPS Gateway", step by step; the Gateway says
    ``protocol: HTTP`` and ``mode: MUTUAL`` with a Secret that has no CA."""
    tmp = os.path.join(env.tmp, "readme")
    os.makedirs(tmp, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    "tls.key", "-out", "tls.crt", "-days", "365", "-subj", "/CN=kubeedge.io"],
                   cwd=tmp, check=True, capture_output=True)
    pods = env.apply("hostname-lb-random-gateway-tls.yaml")
    # before the Secret exists the port is not ready — and never plaintext
    netlab.wait_for(lambda: "[-] gateway-tls: port 23333" in env.gw.run(
        "curl", "-s", f"http://{ADMIN}/readyz").stdout, timeout=30, what="gateway-tls [-]")
    assert env.client.run("curl", "-s", "--max-time", "5", f"http://{GW}:23333/",
                          check=False).stdout not in pods
    # kubectl create secret tls gw-secret --key tls.key --cert tls.crt
    with open(os.path.join(tmp, "tls.crt"), "rb") as c, \
            open(os.path.join(tmp, "tls.key"), "rb") as k:
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                  "metadata": {"name": "gw-secret"},
                  "data": {"tls.crt": base64.b64encode(c.read()).decode(),
                           "tls.key": base64.b64encode(k.read()).decode()}}
    with open(os.path.join(tmp, "gw-secret.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(secret, f)
    pods = env.apply("hostname-lb-random-gateway-tls.yaml", extra=(secret,))

    def readme_curl(*extra: str) -> subprocess.CompletedProcess[str]:
        """The README's command, run where tls.crt and tls.key are."""
        return env.client.run("sh", "-c", f"cd {shlex.quote(tmp)} && exec curl --max-time 10 "
                              f"{' '.join(extra)} -k --cert ./tls.crt --key ./tls.key "
                              f"https://{GW}:23333", check=False)
    netlab.wait_for(lambda: readme_curl("-s").stdout in pods, timeout=30,
                    what="curl -k --cert ./tls.crt --key ./tls.key https://GATEWAY:23333")
    out = readme_curl("-sS", "-v").stderr
    assert "TLSv1.2" in out and "ECDHE-RSA-AES" in out  # the example's versions and suites
    assert "[+] gateway-tls ok" in env.gw.run("curl", "-s", f"http://{ADMIN}/readyz").stdout
    # without a client certificate too: MUTUAL without a CA runs as SIMPLE, as in Go
    assert env.curl("-k", f"https://{GW}:23333") in pods
    assert env.client.run("curl", "-s", "--max-time", "5", f"http://{GW}:23333/",
                          check=False).stdout not in pods
    log = env.gateway.log()
    assert "port.protocol HTTP disagrees with tls.credentialName gw-secret" in log
    assert "running as SIMPLE" in log
    view = env.debug(env.gw, "gateway")["ports"]["23333"]
    assert view["kind"] == "TLS" and view["servers"][0]["protocol"] == "HTTPS"
    # with ca.crt in the Secret the gateway asks for a client certificate, as Go does: the
    # README's self-signed tls.crt is its own CA, so its curl still passes; one without fails
    secret["data"]["ca.crt"] = secret["data"]["tls.crt"]
    pods = env.apply("hostname-lb-random-gateway-tls.yaml", extra=(secret,))
    netlab.wait_for(lambda: env.client.run("curl", "-sk", "--max-time", "5",
                                           f"https://{GW}:23333", check=False).returncode != 0,
                    timeout=30, what="a client certificate required")
    netlab.wait_for(lambda: readme_curl("-s").stdout in pods, timeout=30,
                    what="the README's curl with its certificate")
