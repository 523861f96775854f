"""Dual-stack services end to end: a real agent with iptables and ip6tables inside a "node"
namespace, pods with an IPv4 and an IPv6 address on its lo, real clients (curl -6, dig AAAA,
a connected UDP socket) in a client namespace that routes the IPv6 service range through the
node (PREROUTING) and on the node itself (OUTPUT).

Every backend answers with the address it was reached at, so "the IPv6 listener balances over
the IPv6 endpoints" is seen in the answers, not assumed.
"""
from __future__ import annotations

import json
import os
import signal
import textwrap

import pytest
import yaml

from tests import netlab
from tests.e2e.udp_peers import UDP_CLIENT, UDP_ECHO
from tests.procs import Proc, edgemesh_argv, wait_ready

pytestmark = pytest.mark.netns

NODE_IP, CLIENT_IP = "192.168.50.1", "192.168.50.2"
NODE_IP6, CLIENT_IP6 = "fd00:50::1", "fd00:50::2"
PODS = ["172.17.0.2", "172.17.0.3"]
PODS6 = ["fd00:10:244::2", "fd00:10:244::3"]
WEB, WEB6, EXTERNAL6 = "10.96.0.20", "fd00:10:96::20", "fd00:192::50"
ECHO, ECHO6 = "10.96.0.30", "fd00:10:96::30"
PAGE6 = "fd00:10:96::50"  # an http port balanced per request (a header-hash DestinationRule)
LISTEN6 = "fd00:169:254:96::16"  # commonConfig.bridgeDeviceIPv6's default
ADMIN = "127.0.0.1:10561"
DNS = "169.254.96.16"


def _service(name: str, ips: list[str], port: int, target: int, protocol: str,
             **spec: object) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ips[0], "clusterIPs": ips,
                     "ipFamilies": ["IPv6" if ":" in ip else "IPv4" for ip in ips],
                     "ipFamilyPolicy": "PreferDualStack" if len(ips) > 1 else "SingleStack",
                     "ports": [{"name": "p", "port": port, "targetPort": target,
                                "protocol": protocol}], **spec}}


def _slice(name: str, ips: list[str], port: int, protocol: str) -> dict:
    family = "IPv6" if ":" in ips[0] else "IPv4"
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-{family.lower()}", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": family,
            "ports": [{"name": "p", "port": port, "protocol": protocol}],
            "endpoints": [{"addresses": [ip], "nodeName": "node"} for ip in ips]}


def manifests(dual_stack: bool = True) -> list[dict]:
    v6 = dual_stack
    return [
        _service("web", [WEB, WEB6] if v6 else [WEB], 80, 8080, "TCP",
                 **({"externalIPs": [EXTERNAL6]} if v6 else {})),
        _slice("web", PODS, 8080, "TCP"),
        *([_slice("web", PODS6, 8080, "TCP")] if v6 else []),
        _service("echo", [ECHO, ECHO6] if v6 else [ECHO], 7, 7007, "UDP"),
        _slice("echo", PODS, 7007, "UDP"),
        *([_slice("echo", PODS6, 7007, "UDP")] if v6 else []),
        _service("v4only", ["10.96.0.40"], 80, 8080, "TCP"),
        _slice("v4only", PODS, 8080, "TCP"),
        *(page() if v6 else []),
    ]


def page() -> list[dict]:
    """``page``: IPv6 only, port named http, DestinationRule hashing a header: the HTTP
    engine's listener (not the TCP splice) on the IPv6 listen address."""
    svc = _service("page", [PAGE6], 80, 8000, "TCP")
    svc["spec"]["ports"][0]["name"] = "http"
    eps = _slice("page", PODS6[:1], 8000, "TCP")
    eps["ports"][0]["name"] = "http"
    rule = {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
            "metadata": {"name": "page", "namespace": "default"},
            "spec": {"host": "page", "trafficPolicy": {"loadBalancer": {
                "consistentHash": {"httpHeaderName": "x-user"}}}}}
    return [svc, eps, rule]


# N sequential connections; prints how often each backend identity answered.
TCP_COUNT = textwrap.dedent("""
    import json, socket, sys
    ip, n = sys.argv[1], int(sys.argv[2])
    counts = {}
    for _ in range(n):
        s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
        s.settimeout(10)
        try:
            s.connect((ip, 80)); s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            who = s.makefile().readline().strip()
        except OSError as e:
            who = "error: " + str(e)
        counts[who] = counts.get(who, 0) + 1
        s.close()
    print(json.dumps(counts))
""")


class Env:
    def __init__(self, lab: netlab.Lab, tmp: str) -> None:
        self.tmp = tmp
        lan = lab.switch("lan")
        self.node = lab.host("node", lan, f"{NODE_IP}/24")
        self.client = lab.host("cli", lan, f"{CLIENT_IP}/24")
        for ns in (self.node, self.client):
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "0")
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "0")
        self.node.run("ip", "addr", "add", f"{NODE_IP6}/64", "dev", "eth0", "nodad")
        self.client.run("ip", "addr", "add", f"{CLIENT_IP6}/64", "dev", "eth0", "nodad")
        self.client.run("ip", "route", "add", "10.96.0.0/12", "via", NODE_IP)
        for net in ("fd00:10:96::/112", f"{EXTERNAL6}/128"):
            self.client.run("ip", "route", "add", net, "via", NODE_IP6)
        for ip in PODS:
            self.node.run("ip", "addr", "add", f"{ip}/32", "dev", "lo")
        for ip in PODS6:
            self.node.run("ip", "addr", "add", f"{ip}/128", "dev", "lo")
        for ip in PODS + PODS6:
            listen = f"TCP6-LISTEN:8080,bind=[{ip}]" if ":" in ip else \
                f"TCP-LISTEN:8080,bind={ip}"
            self.node.answer_server(listen, ip)
            self.node.popen(["python3", "-c", UDP_ECHO, ip])
        # the pods must listen before the first test, or the proxy finds every endpoint
        # refusing (and says so with an empty answer): seen on a loaded machine
        www = os.path.join(tmp, "www")
        os.mkdir(www)
        with open(os.path.join(www, "index.html"), "w") as f:
            f.write("page over IPv6")
        self.node.popen(["python3", "-m", "http.server", "8000", "--bind", PODS6[0],
                         "--directory", www])
        self.node.wait_listening(f"[{PODS6[0]}]:8000", *(
            f"{ip}:{port}" if ":" not in ip else f"[{ip}]:{port}"
            for ip in PODS + PODS6 for port in (8080, 7007)))
        self.mdir = self.write_manifests("dual", manifests())
        self.config = os.path.join(tmp, "config.yaml")
        with open(self.config, "w") as f:
            yaml.safe_dump({"modules": {
                "edgeDNS": {"cacheDNS": {"enable": False}}, "edgeTunnel": {"enable": False},
                "edgeProxy": {"connectTimeout": 1.0, "iptablesSyncPeriod": 1.0,
                              "serviceCIDR": ["10.96.0.0/12", "fd00:10:96::/112"]}},
                "commonConfig": {"stateDir": os.path.join(tmp, "state")}}, f)

    def write_manifests(self, name: str, docs: list[dict]) -> str:
        mdir = os.path.join(self.tmp, name)
        os.mkdir(mdir)
        with open(os.path.join(mdir, "all.yaml"), "w") as f:
            yaml.safe_dump_all(docs, f)
        return mdir

    def agent(self, mdir: str | None = None) -> Proc:
        proc = Proc(["agent", "--config", self.config, "--manifests", mdir or self.mdir,
                     "--node-name", "node", "--admin", ADMIN], ns=self.node)
        wait_ready(proc, ADMIN, self.node)
        netlab.wait_for(lambda: "[+] proxy ok" in self.node.run(
            "curl", "-s", f"http://{ADMIN}/readyz").stdout, timeout=20, what="proxy ready")
        return proc

    def curl(self, ns: netlab.Netns, url: str, *flags: str) -> tuple[int, str]:
        r = ns.run("curl", "-sS", "-g", "--http0.9", "--max-time", "5", *flags, url,
                   check=False)
        return r.returncode, r.stdout.strip()

    def save(self, binary: str, table: str = "nat") -> str:
        return self.node.run(f"{binary}-save", "-t", table).stdout

    def view(self) -> dict:
        return json.loads(self.node.run("curl", "-s", f"http://{ADMIN}/debug/proxy").stdout)

    def metrics(self) -> str:
        return self.node.run("curl", "-s", f"http://{ADMIN}/metrics").stdout


@pytest.fixture(scope="module")
def env(module_lab: tuple[netlab.Lab, str]):
    e = Env(*module_lab)
    e.proc = e.agent()
    yield e
    e.proc.stop()


def test_ipv6_ruleset_mirrors_the_ipv4_one_for_ipv6_addresses_only(env: Env) -> None:
    nat6, nat4 = env.save("ip6tables"), env.save("iptables")
    assert nat6.count("-A PREROUTING -j EDGEMESH-PREROUTING") == 1
    assert nat6.count("-A OUTPUT -j EDGEMESH-OUTPUT") == 1
    assert "-A EDGEMESH-PREROUTING -d ::1/128 -j RETURN" in nat6
    view = {f"{lst['service']}/{lst['family']}": lst for lst in env.view()["listeners"]}
    web6, echo6 = view["default/web/IPv6"], view["default/echo/IPv6"]
    assert web6["listen"].startswith(f"[{LISTEN6}]:") and web6["addresses"] == [
        f"[{WEB6}]:80", f"[{EXTERNAL6}]:80"]
    assert echo6["endpoints"] == [f"{ip}:7007" for ip in PODS6]  # IPv6 endpoints only
    web_port, echo_port = web6["listen"].rsplit(":", 1)[1], echo6["listen"].rsplit(":", 1)[1]
    for ip in (WEB6, EXTERNAL6):
        assert (f"-A EDGEMESH-SERVICES -d {ip}/128 -p tcp -m tcp --dport 80 -m comment "
                f'--comment "default/web:80/tcp/ipv6" -j DNAT --to-destination '
                f"[{LISTEN6}]:{web_port}") in nat6
    mangle6 = env.save("ip6tables", "mangle")
    assert (f"-A EDGEMESH-TPROXY -d {ECHO6}/128 -p udp -m udp --dport 7 -m comment --comment "
            f'"default/echo:7/udp/ipv6" -j TPROXY --on-port {echo_port} --on-ip {LISTEN6} '
            "--tproxy-mark 0x2000/0x2000") in mangle6
    assert "-A EDGEMESH-PREROUTING -d ::1/128 ! -i lo -j RETURN" in mangle6
    assert nat6.count("DNAT") == 3 and "v4only" not in nat6  # single-stack IPv4: nothing
    assert web_port != echo_port  # one TCP listener, one UDP socket
    assert "-A INPUT -j EDGEMESH-INPUT" in env.save("ip6tables", "filter")
    # the IPv4 ruleset is what it always was: IPv4 addresses only
    assert nat4.count("DNAT") == 2 and ":" not in "".join(
        line.split("--comment")[0] for line in nat4.splitlines() if "DNAT" in line)
    assert view["default/v4only/IPv4"] and "default/v4only/IPv6" not in view
    assert env.view()["ip6tables"] in ("ip6tables-nft", "ip6tables-legacy")
    assert LISTEN6 in env.node.run("ip", "-6", "addr", "show", "dev", "edgemesh0").stdout


def test_curl_6_through_the_ipv6_cluster_ip_and_external_ip(env: Env) -> None:
    for ns in (env.client, env.node):
        code, who = env.curl(ns, f"http://[{WEB6}]/", "-6")
        assert code == 0 and who in PODS6, (code, who)
        code, who = env.curl(ns, f"http://{WEB}/")  # IPv4 beside it, to IPv4 endpoints
        assert code == 0 and who in PODS, (code, who)
    assert env.curl(env.client, f"http://[{EXTERNAL6}]/")[1] in PODS6


def test_per_request_http_on_ipv6(env: Env) -> None:
    view = {f"{lst['service']}/{lst['family']}": lst for lst in env.view()["listeners"]}
    assert view["default/page/IPv6"]["hashKey"] == "httpHeaderName"
    for ns in (env.client, env.node):
        r = ns.run("curl", "-sS", "-g", "-6", "--max-time", "5", "-H", "x-user: ada",
                   "-D", "-", f"http://[{PAGE6}]/")
        assert r.stdout.startswith("HTTP/1.") and r.stdout.endswith("page over IPv6"), r.stdout


def test_dns_answers_aaaa_and_the_answer_is_reachable(env: Env) -> None:
    # the agent's DNS serves clients on this node; its answer works from the client too
    aaaa = env.node.run("dig", "+short", "+time=3", "+tries=2", f"@{DNS}", "AAAA",
                        "web.default.svc.cluster.local").stdout.split()
    assert aaaa == [WEB6]
    for ns in (env.node, env.client):
        code, who = env.curl(ns, f"http://[{aaaa[0]}]/")
        assert code == 0 and who in PODS6


def test_ipv6_round_robin_over_the_ipv6_endpoints(env: Env) -> None:
    out = env.client.run("python3", "-c", TCP_COUNT, WEB6, "20", timeout=60).stdout
    assert json.loads(out) == {ip: 10 for ip in PODS6}  # round robin: exactly 10 each


def test_udp_echo_over_ipv6_replies_from_the_cluster_ip(env: Env) -> None:
    for ns in (env.client, env.node):
        lines = ns.run("python3", "-c", UDP_CLIENT, ECHO6, "7", timeout=30).stdout.split("\n")
        backend = lines[0].split()[0]
        assert backend in PODS6
        assert lines[:3] == [f"{backend} ping {i}" for i in range(3)]  # one session
        assert lines[3] == ECHO6
    lines = env.client.run("python3", "-c", UDP_CLIENT, ECHO, "7", timeout=30).stdout.split()
    assert lines[0] in PODS + PODS6  # IPv4 beside it


def test_periodic_resync_repairs_ipv6_drift(env: Env) -> None:
    env.node.run("ip6tables-restore", "--noflush", input=(
        b"*nat\n-D OUTPUT -j EDGEMESH-OUTPUT\n-F EDGEMESH-SERVICES\nCOMMIT\n"))
    netlab.wait_for(lambda: env.save("ip6tables").count("DNAT") == 3, timeout=15,
                    what="ipv6 rules restored")
    assert env.save("ip6tables").count("-A OUTPUT -j EDGEMESH-OUTPUT") == 1
    assert env.curl(env.node, f"http://[{WEB6}]/")[1] in PODS6


def test_ipv6_rules_vanish_on_exit_and_with_cleanup(env: Env) -> None:
    env.proc.stop()
    for table in ("nat", "filter"):
        assert "EDGEMESH" not in env.save("ip6tables", table)
        assert "EDGEMESH" not in env.save("iptables", table)
    assert "fd00:10:96::/112" not in env.node.run("ip", "-6", "route").stdout
    proc = env.agent()
    assert "EDGEMESH-SERVICES" in env.save("ip6tables")
    proc.stop(signal.SIGKILL)
    assert "EDGEMESH-SERVICES" in env.save("ip6tables")  # nobody cleaned up after kill -9...
    netlab.sh("ip", "netns", "exec", env.node.name, *edgemesh_argv(), "cleanup", "--config",
              env.config)
    assert "EDGEMESH" not in env.save("ip6tables") + env.save("ip6tables", "filter")
    assert LISTEN6 not in env.node.run("ip", "-6", "addr").stdout  # ...until edgemesh cleanup
    env.proc = env.agent()


def test_no_ipv6_service_addresses_no_ipv6_rules_or_listeners(env: Env) -> None:
    env.proc.stop(signal.SIGKILL)
    v4 = env.write_manifests("v4", manifests(dual_stack=False))
    assert "EDGEMESH-SERVICES" in env.save("ip6tables")
    env.agent(v4).stop(signal.SIGKILL)  # the next agent, without IPv6 services, removes them
    assert "EDGEMESH" not in env.save("ip6tables") + env.save("ip6tables", "filter")
    netlab.sh("ip", "netns", "exec", env.node.name, *edgemesh_argv(), "cleanup", "--config",
              env.config)
    proc = env.agent(v4)
    try:
        assert "EDGEMESH" not in env.save("ip6tables") + env.save("ip6tables", "filter")
        assert LISTEN6 not in env.node.run("ip", "-6", "addr").stdout
        assert all(lst["family"] == "IPv4" for lst in env.view()["listeners"])
        assert env.view()["ip6tables"] is None
        assert env.curl(env.client, f"http://{WEB}/")[1] in PODS
    finally:
        proc.stop()
    env.proc = env.agent()


def test_ipv6_disabled_host_keeps_serving_ipv4(env: Env) -> None:
    env.proc.stop()
    netlab.sh("ip", "netns", "exec", env.node.name, *edgemesh_argv(), "cleanup", "--config",
              env.config)
    env.node.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
    env.node.sysctl("net.ipv6.conf.default.disable_ipv6", "1")
    try:
        proc = env.agent()
        try:
            code, who = env.curl(env.client, f"http://{WEB}/")
            assert who in PODS, (code, who, proc.log()[-3000:])
            lines = env.client.run("python3", "-c", UDP_CLIENT, ECHO, "7").stdout.split()
            assert lines[0] in PODS
            view = env.view()
            assert view["ip6tables"] is None and view["ipv6Error"]
            assert all(lst["family"] == "IPv4" for lst in view["listeners"])
            assert 'edgemesh_proxy_ipv6_failures_total{stage="address"}' in env.metrics()
            assert "EDGEMESH" not in env.save("ip6tables")
            assert proc.log().count("IPv6 service addresses not intercepted") == 1
        finally:
            proc.stop()
    finally:
        env.node.sysctl("net.ipv6.conf.all.disable_ipv6", "0")
        env.node.sysctl("net.ipv6.conf.default.disable_ipv6", "0")
