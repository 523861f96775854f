"""HTTP, WebSocket and HTTPS through a ClusterIP, end to end: a real agent with iptables in a
"node" namespace, h11 endpoints (tests/httpbackends.py) and openssl s_server on pod IPs on its
lo, real clients (curl, requests, websockets, openssl s_client) in a client namespace.

The agent runs with ``perRequestHTTP: true``: every http port is balanced per request.
Statistical checks state their tolerance next to the assertion; nothing is timed.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
import yaml

from tests import netlab
from tests.procs import ROOT, Proc, wait_ready

pytestmark = pytest.mark.netns

NODE_IP, CLIENT_IP = "192.168.60.1", "192.168.60.2"
PODS = ["172.17.0.2", "172.17.0.3", "172.17.0.4"]
DEAD_POD = "172.17.0.9"  # an address on lo with nothing listening: connects are refused
ADMIN = "127.0.0.1:10558"
SOURCES = [f"192.168.60.{i}" for i in range(10, 22)]


def service(name: str, ip: str, port: int, target: int, port_name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"name": port_name, "port": port,
                                                 "targetPort": target}]}}


def endpoints(name: str, ips: list[str], port: int, port_name: str) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": port_name, "port": port}],
            "endpoints": [{"addresses": [ip], "nodeName": "node"} for ip in ips]}


def hash_rule(name: str, consistent_hash: dict) -> dict:
    return {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"host": name,
                     "trafficPolicy": {"loadBalancer": {"consistentHash": consistent_hash}}}}


def manifests() -> list[dict]:
    docs = []
    for name, ip, port_name, target, pods in [
            ("web", "10.96.1.10", "http", 8080, PODS),
            ("byheader", "10.96.1.11", "http", 8080, PODS),
            ("bycookie", "10.96.1.12", "http-web", 8080, PODS),
            ("bysource", "10.96.1.13", "http", 8080, PODS),
            ("plain", "10.96.1.14", "tcp", 8080, PODS),  # WebSocket on a plain TCP port
            ("secure", "10.96.1.15", "https", 8443, PODS),
            ("empty", "10.96.1.16", "http", 8080, []),
            ("dead", "10.96.1.17", "http", 8080, [DEAD_POD])]:
        docs += [service(name, ip, 80 if port_name != "https" else 443, target, port_name),
                 endpoints(name, pods, target, port_name)]
    docs += [hash_rule("byheader", {"httpHeaderName": "x-user"}),
             hash_rule("bycookie", {"httpCookie": {"name": "sid", "path": "/", "ttl": "60s"}}),
             hash_rule("bysource", {"useSourceIp": True}),
             hash_rule("secure", {"useSourceIp": True})]
    return docs


CONFIG = {"modules": {"edgeDNS": {"enable": False}, "edgeTunnel": {"enable": False},
                      "edgeProxy": {"perRequestHTTP": True, "httpResponseTimeout": 1.0}},
          "commonConfig": {"stateDir": "/tmp/edgemesh-http-e2e-state"}}

WS_CLIENT = textwrap.dedent("""
    import sys
    from websockets.sync.client import connect
    with connect(sys.argv[1], additional_headers={"X-User": "alice"}, open_timeout=10) as ws:
        out = []
        for i in range(3):
            ws.send(f"m{i}")
            out.append(ws.recv(timeout=10))
        ws.send(b"binary")
        out.append(ws.recv(timeout=10).decode())
    print(" ".join(out))
""")

REQUESTS_CLIENT = textwrap.dedent("""
    import json, sys
    import requests
    url, n, header = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    names, cookies = [], set()
    with requests.Session() as s:
        for i in range(n):
            r = s.get(url, headers=dict([header]) if header else {}, timeout=10)
            names.append(r.json()["name"])
            if "Set-Cookie" in r.headers:
                cookies.add(r.headers["Set-Cookie"])
    print(json.dumps({"names": names, "cookies": sorted(cookies)}))
""")


class Env:
    def __init__(self, lab: netlab.Lab, tmp: str) -> None:
        lan = lab.switch("lan")
        self.node = lab.host("node", lan, f"{NODE_IP}/24")
        self.client = lab.host("cli", lan, f"{CLIENT_IP}/24")
        for ip in SOURCES:
            self.client.run("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        self.client.run("ip", "route", "add", "10.96.0.0/12", "via", NODE_IP)
        for ip in [*PODS, DEAD_POD]:
            self.node.run("ip", "addr", "add", f"{ip}/32", "dev", "lo")
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        netlab.sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                  "-subj", "/CN=secure.default", "-keyout", key, "-out", cert)
        for i, ip in enumerate(PODS):
            self.node.popen([sys.executable, "-m", "tests.httpbackends", f"pod{i}", ip, "8080"],
                            cwd=ROOT)
            self.node.popen(["openssl", "s_server", "-accept", f"{ip}:8443", "-cert", cert,
                             "-key", key, "-www", "-quiet"])
        mdir = os.path.join(tmp, "manifests")
        os.mkdir(mdir)
        with open(os.path.join(mdir, "all.yaml"), "w") as f:
            yaml.safe_dump_all(manifests(), f)
        config = os.path.join(tmp, "config.yaml")
        with open(config, "w") as f:
            yaml.safe_dump(CONFIG, f)
        for ip in PODS:
            netlab.wait_for(lambda ip=ip: self.node.run(
                "curl", "-s", f"http://{ip}:8080/", check=False).returncode == 0,
                timeout=15, what=f"endpoint {ip}")
        self.proc = Proc(["agent", "--config", config, "--manifests", mdir, "--node-name",
                          "node", "--admin", ADMIN], ns=self.node)
        wait_ready(self.proc, ADMIN, self.node)
        netlab.wait_for(lambda: "[+] proxy ok" in self.node.run(
            "curl", "-s", f"http://{ADMIN}/readyz").stdout, timeout=20, what="proxy ready")

    def curl(self, *args: str, source: str | None = None) -> str:
        extra = ["--interface", source] if source else []
        return self.client.run("curl", "-sS", "--max-time", "15", *extra, *args,
                               timeout=30).stdout

    def python(self, code: str, *args: str) -> str:
        return self.client.run(sys.executable, "-c", code, *args, timeout=60).stdout


@pytest.fixture(scope="module")
def env(module_lab: tuple[netlab.Lab, str]):
    e = Env(*module_lab)
    yield e
    e.proc.stop()


def test_listeners_are_http_and_https_where_they_should_be(env: Env) -> None:
    out = json.loads(env.node.run("curl", "-s", f"http://{ADMIN}/debug/proxy").stdout)
    by_service = {item["service"]: item for item in out["listeners"]}
    assert by_service["default/byheader"]["hashKey"] == "httpHeaderName"
    assert set(by_service) >= {"default/web", "default/secure", "default/plain"}


def test_curl_keep_alive_requests_are_spread_per_request(env: Env) -> None:
    url = "http://10.96.1.10/"
    out = env.curl("-w", "\\n%{num_connects}\\n", *[url] * 9)
    bodies = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    connects = [int(line) for line in out.splitlines() if line.isdigit()]
    assert sum(connects) == 1  # nine requests, one connection
    assert sorted(b["name"] for b in bodies) == sorted(["pod0", "pod1", "pod2"] * 3)


def test_requests_session_spreads_and_sticks_by_header(env: Env) -> None:
    spread = json.loads(env.python(REQUESTS_CLIENT, "http://10.96.1.10/", "12"))["names"]
    assert sorted(spread) == sorted(["pod0", "pod1", "pod2"] * 4)  # round robin: exact
    for user in ("alice", "bob", "carol"):
        names = json.loads(env.python(REQUESTS_CLIENT, "http://10.96.1.11/", "8",
                                      "X-User", user))["names"]
        assert len(set(names)) == 1, names


def test_cookie_is_set_once_then_sticks(env: Env) -> None:
    out = json.loads(env.python(REQUESTS_CLIENT, "http://10.96.1.12/", "10"))
    assert len(set(out["names"])) == 1  # the session sends the cookie back: one endpoint
    (cookie,) = out["cookies"]  # set on the first response only
    assert cookie.startswith('sid="') and "Max-Age=60" in cookie and "Path=/" in cookie


def test_sticky_by_source_ip_per_request(env: Env) -> None:
    seen = {}
    for ip in SOURCES:
        out = env.curl(*["http://10.96.1.13/"] * 3, source=ip)
        names = {json.loads(line)["name"] for line in out.replace("}{", "}\n{").splitlines()}
        assert len(names) == 1, (ip, names)
        seen[ip] = names.pop()
    assert len(set(seen.values())) >= 2  # 12 sources do not all hash to one of 3 endpoints


def test_websocket_through_http_and_tcp_ports(env: Env) -> None:
    for url in ("ws://10.96.1.11/ws", "ws://10.96.1.14/ws"):
        out = env.python(WS_CLIENT, url).split()
        pod = out[0].split(":")[0]
        assert out == [f"{pod}:m0", f"{pod}:m1", f"{pod}:m2", "yranib"], out


def test_bodies_chunked_large_and_expect_continue(env: Env, tmp_path: object) -> None:
    code = textwrap.dedent("""
        import hashlib, json, requests
        big = bytes(range(256)) * 40000
        with requests.Session() as s:
            up = s.post("http://10.96.1.10/up", data=iter([big[:7], big[7:]]), timeout=30).json()
            down = s.get("http://10.96.1.10/?size=5000000", timeout=30).content
        print(json.dumps({"size": up["size"], "ok": up["sha256"] == hashlib.sha256(big)
                          .hexdigest(), "down": down == bytes(i % 251 for i in range(5000000))}))
    """)
    assert json.loads(env.python(code)) == {"size": 10240000, "ok": True, "down": True}
    out = env.client.run("sh", "-c", "head -c 300000 /dev/zero | curl -sS --max-time 15 "
                         "-H 'Expect: 100-continue' --data-binary @- http://10.96.1.10/e")
    assert json.loads(out.stdout)["size"] == 300000


def test_https_passes_through_with_sni_seen(env: Env) -> None:
    assert "s_server" in env.curl("-k", "https://10.96.1.15/")
    r = env.client.run("sh", "-c", "echo Q | openssl s_client -connect 10.96.1.15:443 "
                       "-servername secure.default.svc", check=False, timeout=30)
    assert "CN = secure.default" in r.stdout + r.stderr
    metrics = env.node.run("curl", "-s", f"http://{ADMIN}/metrics").stdout
    assert 'edgemesh_proxy_tls_connections_total{service="default/secure:443/tcp",' \
           'sni="secure.default.svc"} 1' in metrics


def test_https_sticks_by_source_ip(env: Env) -> None:
    seen = {}
    for ip in SOURCES[:6]:
        pods = {pod for _ in range(3) for pod in PODS
                if f"-accept {pod}:" in env.curl("-k", "https://10.96.1.15/", source=ip)}
        assert len(pods) == 1, (ip, pods)  # per connection, by source IP: always the same pod
        seen[ip] = pods.pop()
    assert len(set(seen.values())) >= 2  # 6 sources do not all hash to one of 3 pods


def test_errors_users_understand(env: Env) -> None:
    def status_and_body(url: str) -> tuple[str, str]:
        out = env.curl("-w", "\\n%{http_code}", url).rsplit("\n", 1)
        return out[1], out[0]
    code, body = status_and_body("http://10.96.1.16/")
    assert code == "503" and "default/empty" in body
    code, body = status_and_body("http://10.96.1.17/")
    assert code == "502" and "default/dead" in body
    code, body = status_and_body("http://10.96.1.10/slow")
    assert code == "504" and "default/web" in body
    bad = env.client.run("sh", "-c", "printf 'GET / HTTP/1.1\\r\\nHost: a\\r\\n"
                         "Content-Length: x\\r\\n\\r\\n' | socat -t 5 - TCP:10.96.1.10:80")
    assert bad.stdout.startswith("HTTP/1.1 400 ")
