"""The service proxy end to end: a real agent with iptables inside a "node" namespace, pods on
its lo, real clients (curl, dig, iperf3, a UDP echo, raw sockets) in a client namespace that
routes the service range through the node (PREROUTING) and in the node itself (OUTPUT).

Statistical checks state their tolerance next to the assertion; nothing is timed.
"""
from __future__ import annotations

import json
import os
import signal
import textwrap

import pytest
import yaml

from tests import netlab
from tests.procs import Proc, wait_ready

pytestmark = pytest.mark.netns

NODE_IP, CLIENT_IP = "192.168.50.1", "192.168.50.2"
PODS = ["172.17.0.2", "172.17.0.3", "172.17.0.4"]
DNS_POD, IPERF_POD = "172.17.0.5", "172.17.0.6"
ADMIN = "127.0.0.1:10557"
EXTRA_CLIENT_IPS = [f"192.168.50.{i}" for i in range(10, 30)]


def _service(name: str, ip: str, port: int, target: int, protocol: str = "TCP",
             port_name: str = "tcp", **spec: object) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"name": port_name, "port": port,
                                                 "targetPort": target, "protocol": protocol}],
                     **spec}}


def _slice(name: str, ips: list[str], port: int, protocol: str = "TCP",
           port_name: str = "tcp") -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": port_name, "port": port, "protocol": protocol}],
            "endpoints": [{"addresses": [ip], "nodeName": "node"} for ip in ips]}


def _dr(host: str, lb: dict) -> dict:
    return {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
            "metadata": {"name": host, "namespace": "default"},
            "spec": {"host": host, "trafficPolicy": {"loadBalancer": lb}}}


SERVICES = {  # name: (ClusterIP, extra spec, DestinationRule load balancer)
    "rr": ("10.96.0.10", {}, None),
    "random": ("10.96.0.11", {}, {"simple": "RANDOM"}),
    "least": ("10.96.0.12", {}, {"simple": "LEAST_REQUEST"}),
    "sticky": ("10.96.0.13", {"sessionAffinity": "ClientIP"}, None),
    "hash": ("10.96.0.14", {}, {"consistentHash": {"useSourceIp": True}}),
}


def manifests() -> list[dict]:
    docs: list[dict] = []
    for name, (ip, extra, lb) in SERVICES.items():
        docs += [_service(name, ip, 80, 8080, **extra), _slice(name, PODS, 8080)]
        if lb:
            docs.append(_dr(f"{name}.default.svc.cluster.local", lb))
    docs += [_service("web", "10.96.0.20", 80, 8000, port_name="http"),
             _slice("web", [PODS[0]], 8000, port_name="http"),
             _service("echo", "10.96.0.30", 7, 7007, "UDP", "udp"),
             _slice("echo", PODS, 7007, "UDP", "udp"),
             _service("dns", "10.96.0.53", 53, 53, "UDP", "dns"),
             _slice("dns", [DNS_POD], 53, "UDP", "dns"),
             _service("iperf", "10.96.0.40", 5201, 5201),
             _slice("iperf", [IPERF_POD], 5201),
             {**_service("kube", "10.96.0.50", 80, 8080),
              "metadata": {"name": "kube", "namespace": "default", "labels": {
                  "service.edgemesh.kubeedge.io/service-proxy-name": "kube-proxy"}}},
             _slice("kube", PODS, 8080),
             _service("headless", "None", 80, 8080),
             _slice("headless", PODS, 8080)]
    return docs


CONFIG = {"modules": {"edgeDNS": {"enable": False}, "edgeTunnel": {"enable": False},
                      "edgeProxy": {"udpIdleTimeout": 60, "connectTimeout": 1.0,
                                    "iptablesSyncPeriod": 1.0}},
          "commonConfig": {"stateDir": "/tmp/edgemesh-proxy-e2e-state"}}

UDP_ECHO = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], 7007))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(sys.argv[1].encode() + b" " + data, peer)
""")

# Opens N connections (sequential, or all held open with --hold) from optional source IPs and
# prints how many each backend identity answered; failures are counted, never raised.
CLIENT = textwrap.dedent("""
    import json, socket, sys
    ip, port, n, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "hold"
    sources = sys.argv[5].split(",") if len(sys.argv) > 5 else [""]
    counts, failures, held = {}, 0, []
    for i in range(n):
        src = sources[i % len(sources)]
        try:
            s = socket.socket()
            s.settimeout(10)
            if src:
                s.bind((src, 0))
            s.connect((ip, port))
            who = s.makefile().readline().strip()
            key = src + "->" + who if src else who
            counts[key] = counts.get(key, 0) + 1
            if who == "":
                failures += 1
            held.append(s) if hold else s.close()
        except OSError:
            failures += 1
    print(json.dumps({"counts": counts, "failures": failures}))
""")


class Env:
    def __init__(self, lab: netlab.Lab, tmp: str) -> None:
        self.lab, self.tmp = lab, tmp
        lan = lab.switch("lan")
        self.node = lab.host("node", lan, f"{NODE_IP}/24")
        self.client = lab.host("cli", lan, f"{CLIENT_IP}/24")
        for ip in EXTRA_CLIENT_IPS:
            self.client.run("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        self.client.run("ip", "route", "add", "10.96.0.0/12", "via", NODE_IP)
        for ip in [*PODS, DNS_POD, IPERF_POD]:
            self.node.run("ip", "addr", "add", f"{ip}/32", "dev", "lo")
        self.mdir = os.path.join(tmp, "manifests")
        os.mkdir(self.mdir)
        with open(os.path.join(self.mdir, "all.yaml"), "w") as f:
            yaml.safe_dump_all(manifests(), f)
        self.config = os.path.join(tmp, "config.yaml")
        with open(self.config, "w") as f:
            yaml.safe_dump(CONFIG, f)
        self.backends: dict[str, object] = {}
        for ip in PODS:
            self.start_tcp_backend(ip)
            self.node.popen(["python3", "-c", UDP_ECHO, ip])
        www = os.path.join(tmp, "www")
        os.mkdir(www)
        with open(os.path.join(www, "index.html"), "w") as f:
            f.write("hello from web")
        self.node.popen(["python3", "-m", "http.server", "8000", "--bind", PODS[0],
                         "--directory", www])
        self.node.popen(["dnsmasq", "-k", "-C", "/dev/null", "--no-resolv", "--no-hosts",
                         "--bind-interfaces", f"--listen-address={DNS_POD}", "-p", "53",
                         "--pid-file=", "--address=/app.example/192.0.2.77"])
        self.node.popen(["iperf3", "-s", "-B", IPERF_POD, "-p", "5201"])
        self.node.wait_listening(*(f"{ip}:{port}" for ip in PODS for port in (8080, 7007)),
                                 f"{PODS[0]}:8000", f"{DNS_POD}:53", f"{IPERF_POD}:5201")

    def start_tcp_backend(self, ip: str) -> None:
        self.backends[ip] = self.node.popen(
            ["socat", f"TCP-LISTEN:8080,bind={ip},reuseaddr,fork", f"SYSTEM:echo {ip}; exec cat"])

    def kill_backend(self, ip: str) -> None:
        proc = self.backends.pop(ip)
        proc.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
        proc.wait()  # type: ignore[attr-defined]

    def agent(self) -> Proc:
        proc = Proc(["agent", "--config", self.config, "--manifests", self.mdir,
                     "--node-name", "node", "--admin", ADMIN], ns=self.node)
        wait_ready(proc, ADMIN, self.node)
        # /readyz can answer before the module registers its own check: wait for it by name
        netlab.wait_for(lambda: "[+] proxy ok" in self.node.run(
            "curl", "-s", f"http://{ADMIN}/readyz").stdout, timeout=20, what="proxy ready")
        return proc

    def connect(self, ns: netlab.Netns, ip: str, n: int, hold: bool = False,
                sources: list[str] | None = None) -> dict:
        args = [ip, "80", str(n), "hold" if hold else "seq"]
        if sources:
            args.append(",".join(sources))
        out = ns.run("python3", "-c", CLIENT, *args, timeout=60).stdout
        return json.loads(out)

    def nat(self) -> str:
        return self.node.run("iptables-save", "-t", "nat").stdout


@pytest.fixture(scope="module")
def env(module_lab: tuple[netlab.Lab, str]):
    e = Env(*module_lab)
    e.proc = e.agent()
    yield e
    e.proc.stop()


def test_rules_installed_for_cluster_ips_only(env: Env) -> None:
    nat = env.nat()
    assert nat.count("-A PREROUTING -j EDGEMESH-PREROUTING") == 1
    assert nat.count("-A OUTPUT -j EDGEMESH-OUTPUT") == 1
    for ip, *_ in SERVICES.values():
        assert f"-d {ip}/32 -p tcp" in nat
    # UDP: TPROXY to the transparent UDP listener, nothing rewritten
    mangle = env.node.run("iptables-save", "-t", "mangle").stdout
    assert "-udp" not in nat and mangle.count("-j TPROXY") == 2  # echo, dns
    assert "-A EDGEMESH-TPROXY -d 10.96.0.30/32 -p udp -m udp --dport 7 " in mangle
    assert "-A EDGEMESH-MARK -d 10.96.0.30/32 -p udp -m udp --dport 7 " in mangle
    # web, iperf; not headless, not the one labelled for kube-proxy
    assert nat.count("DNAT") == len(SERVICES) + 2
    assert "10.96.0.50" not in nat + mangle
    # one TCP listener for every TCP service port: every DNAT leads to it
    assert len({line.rsplit(" ", 1)[1] for line in nat.splitlines() if "DNAT" in line}) == 1


def test_curl_through_cluster_ip_from_both_namespaces(env: Env) -> None:
    for ns in (env.client, env.node):
        r = ns.run("curl", "-sS", "--max-time", "10", "http://10.96.0.20/")
        assert r.stdout == "hello from web"


def test_round_robin_is_even(env: Env) -> None:
    result = env.connect(env.client, "10.96.0.10", 90)
    assert result["failures"] == 0
    # sequential connections with round robin: exactly 30 each (tolerance 0)
    assert result["counts"] == {ip: 30 for ip in PODS}


def test_random_spreads(env: Env) -> None:
    result = env.connect(env.client, "10.96.0.11", 150)
    assert result["failures"] == 0 and set(result["counts"]) == set(PODS)
    # expected 50 each, sd ~5.8: tolerance ±25 (> 4 sd)
    assert all(abs(c - 50) <= 25 for c in result["counts"].values()), result


def test_least_request_balances_held_connections(env: Env) -> None:
    result = env.connect(env.client, "10.96.0.12", 30, hold=True)
    assert result["failures"] == 0
    # P2C over 30 concurrently held connections: each within 10 ± 4
    assert all(abs(c - 10) <= 4 for c in result["counts"].values()), result


def test_session_affinity_client_ip_holds(env: Env) -> None:
    result = env.connect(env.client, "10.96.0.13", 40, sources=EXTRA_CLIENT_IPS[:4])
    assert result["failures"] == 0
    # each of the 4 sources always reaches one backend: 4 (source, backend) pairs of 10
    assert sorted(result["counts"].values()) == [10, 10, 10, 10], result


def test_consistent_hash_by_source_ip(env: Env) -> None:
    result = env.connect(env.client, "10.96.0.14", 60, sources=EXTRA_CLIENT_IPS)
    assert result["failures"] == 0
    pairs = result["counts"]
    assert len(pairs) == len(EXTRA_CLIENT_IPS)  # one backend per source IP, 3 each
    assert all(c == 3 for c in pairs.values())
    used = {k.split("->")[1] for k in pairs}
    assert len(used) >= 2  # 20 source IPs do not all hash to one of 3 backends


def test_udp_echo_keeps_datagrams_and_replies_from_cluster_ip(env: Env) -> None:
    code = textwrap.dedent("""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
        s.connect(("10.96.0.30", 7))  # connected: replies from any other source are dropped
        got = []
        for i in range(5):
            s.send(b"x" * (100 + i)); got.append(s.recv(65535).decode())
        print("\\n".join(got))
    """)
    lines = env.client.run("python3", "-c", code).stdout.split("\n")
    backend = lines[0].split()[0]
    assert backend in PODS
    for i, line in enumerate(lines[:5]):  # one session: one backend, boundaries kept
        assert line == f"{backend} " + "x" * (100 + i)


def test_one_udp_socket_to_two_services_gets_each_answer_from_its_own(env: Env) -> None:
    # a forwarder (dnsmasq, say) asks two services from one source port: with one socket for
    # every service, each reply must still come from the service it answers
    code = textwrap.dedent("""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
        s.bind(("0.0.0.0", 0))
        s.sendto(b"ping", ("10.96.0.30", 7))
        data, peer = s.recvfrom(65535)
        print(peer[0], peer[1], data.decode().split()[1])
        q = bytes.fromhex("abcd01000001000000000000")  # id abcd, one question:
        q += b"\\x03app\\x07example\\x00\\x00\\x01\\x00\\x01"  # app.example A IN
        s.sendto(q, ("10.96.0.53", 53))
        data, peer = s.recvfrom(65535)
        print(peer[0], peer[1], data[:2].hex())
    """)
    for ns in (env.client, env.node):
        lines = ns.run("python3", "-c", code).stdout.splitlines()
        assert lines == ["10.96.0.30 7 ping", "10.96.0.53 53 abcd"], lines


def test_dns_over_udp_through_cluster_ip(env: Env) -> None:
    for ns in (env.client, env.node):
        r = ns.run("dig", "+short", "+time=3", "+tries=2", "@10.96.0.53", "app.example")
        assert r.stdout.strip() == "192.0.2.77"


def test_iperf3_through_cluster_ip(env: Env) -> None:
    r = env.client.run("iperf3", "-c", "10.96.0.40", "-t", "1", "-J", timeout=30)
    report = json.loads(r.stdout)
    assert report["end"]["sum_received"]["bytes"] > 1_000_000
    r = env.client.run("iperf3", "-c", "10.96.0.40", "-t", "1", "-R", "-J", timeout=30)
    assert json.loads(r.stdout)["end"]["sum_received"]["bytes"] > 1_000_000


def test_half_close_is_propagated(env: Env) -> None:
    # the backend (cat) echoes until our EOF, then closes: we must still read its echo
    code = textwrap.dedent("""
        import socket
        s = socket.create_connection(("10.96.0.10", 80), timeout=5)
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"last words\\n"); s.shutdown(socket.SHUT_WR)
        print(f.read().decode().strip())
    """)
    assert env.client.run("python3", "-c", code).stdout.strip() == "last words"


def test_killed_endpoint_is_skipped_without_client_errors(env: Env) -> None:
    env.kill_backend(PODS[2])
    try:
        result = env.connect(env.client, "10.96.0.10", 60)
        assert result["failures"] == 0, result
        assert set(result["counts"]) == set(PODS[:2])
        metrics = env.node.run("curl", "-s", f"http://{ADMIN}/metrics").stdout
        assert 'edgemesh_proxy_endpoint_connect_failures_total{service="default/rr:80/tcp"}' \
            in metrics
    finally:
        env.start_tcp_backend(PODS[2])


def test_timed_out_endpoint_is_skipped(env: Env) -> None:
    # SYNs to one endpoint vanish: its connects time out after connectTimeout (1 s here)
    rule = ["OUTPUT", "-d", PODS[1], "-p", "tcp", "--dport", "8080", "-j", "DROP"]
    env.node.run("iptables", "-I", *rule)
    try:
        result = env.connect(env.client, "10.96.0.10", 6)
        assert result["failures"] == 0, result
        assert PODS[1] not in result["counts"]
    finally:
        env.node.run("iptables", "-D", *rule)


def test_periodic_resync_repairs_drift(env: Env) -> None:
    # Damage done in one iptables-restore, so the agent's resync (every 1 s here) can never
    # land between two steps; asserting the damaged state afterwards would race that resync.
    env.node.run("iptables-restore", "--noflush", input=(
        b"*nat\n-D OUTPUT -j EDGEMESH-OUTPUT\n-F EDGEMESH-SERVICES\nCOMMIT\n"
        b"*mangle\n-F EDGEMESH-TPROXY\nCOMMIT\n"))
    netlab.wait_for(lambda: env.nat().count("DNAT") == len(SERVICES) + 2 and env.node.run(
        "iptables-save", "-t", "mangle").stdout.count("-j TPROXY") == 2, timeout=15,
        what="rules restored")
    assert env.nat().count("-A OUTPUT -j EDGEMESH-OUTPUT") == 1
    assert env.connect(env.node, "10.96.0.10", 3)["failures"] == 0


def test_rules_vanish_on_exit_and_after_kill9_with_cleanup(env: Env) -> None:
    env.proc.stop()
    assert "EDGEMESH" not in env.nat() + env.node.run("iptables-save", "-t", "mangle").stdout
    assert "10.96.0.0/12" not in env.node.run("ip", "route").stdout
    assert "0x2000" not in env.node.run("ip", "rule").stdout  # TPROXY's routing too
    # --no-iptables: listeners on 127.0.0.1, the host's rules and routes untouched
    admin = "127.0.0.1:10558"
    bare = Proc(["agent", "--config", env.config, "--manifests", env.mdir, "--node-name",
                 "node", "--admin", admin, "--no-iptables"], ns=env.node)
    netlab.wait_for(lambda: "[+] proxy ok" in env.node.run(
        "curl", "-s", f"http://{admin}/readyz").stdout, timeout=20, what="bare proxy ready")
    view = json.loads(env.node.run("curl", "-s", f"http://{admin}/debug/proxy").stdout)
    assert view["iptables"] is None
    listen = {lst["service"]: lst["listen"] for lst in view["listeners"]}
    assert listen["default/rr"].startswith("127.0.0.1:")
    assert "EDGEMESH" not in env.nat()
    assert "10.96.0.0/12" not in env.node.run("ip", "route").stdout
    host, port = listen["default/rr"].split(":")
    r = env.node.run("python3", "-c", CLIENT, host, port, "3", "seq").stdout
    assert json.loads(r)["failures"] == 0
    bare.stop()
    proc = env.agent()
    assert "EDGEMESH-SERVICES" in env.nat()
    proc.stop(signal.SIGKILL)
    assert "EDGEMESH-SERVICES" in env.nat()  # nobody cleaned up after kill -9...
    argv = ["ip", "netns", "exec", env.node.name, *Proc.__init__.__globals__["edgemesh_argv"](),
            "cleanup", "--config", env.config]
    netlab.sh(*argv)
    assert "EDGEMESH" not in env.nat()  # ...until edgemesh cleanup
    assert "EDGEMESH" not in env.node.run("iptables-save", "-t", "mangle").stdout
    assert "0x2000" not in env.node.run("ip", "rule").stdout
    env.proc = env.agent()


def test_twenty_restarts_leave_no_duplicates(env: Env) -> None:
    env.proc.stop(signal.SIGKILL)
    for _ in range(20):
        proc = env.agent()
        nat = env.nat()
        assert nat.count("-A PREROUTING -j EDGEMESH-PREROUTING") == 1
        assert nat.count("-A OUTPUT -j EDGEMESH-OUTPUT") == 1
        assert nat.count("-d 10.96.0.10/32 ") == 1
        assert env.node.run("ip", "rule").stdout.count("fwmark 0x2000/0x2000") == 1
        proc.stop(signal.SIGKILL)
    env.proc = env.agent()
    assert env.connect(env.client, "10.96.0.10", 3)["failures"] == 0
