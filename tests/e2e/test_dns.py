"""The agent's DNS end to end: a real agent process, dig as the client, dnsmasq upstream.

- every answerable case of the spec table (tests/unit/test_dns_zone.py) asked with dig over
  UDP and over TCP;
- a pod's search-path walk, probe by probe, and through glibc's real resolver (getent) in a
  namespace whose resolv.conf points at the agent;
- forwarding to a dnsmasq upstream, its cache, and the upstream going down (SERVFAIL, cached
  answers still served);
- the agent in a network namespace on 169.254.96.16:53 (edgemesh0): local clients answered,
  clients on another node dropped (UDP) and refused (TCP); ``edgemesh cleanup`` removes it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from bench.dns import free_port  # free for UDP and TCP alike
from tests.netlab import Lab, Netns, wait_for
from tests.procs import Proc, wait_ready
from tests.unit.test_dns_zone import CASES, CLUSTER_YAML, Case

pytestmark = pytest.mark.skipif(not (shutil.which("dig") and shutil.which("dnsmasq")),
                                reason="needs dig and dnsmasq")
ANSWERABLE = [c for c in CASES if not c.forwarded and c.qtype != "AXFR"]


def config_file(directory: str, upstream_port: int | None) -> str:
    path = os.path.join(directory, "agent.yaml")
    upstreams = f"['127.0.0.1:{upstream_port}']" if upstream_port else "[]"
    with open(path, "w", encoding="utf-8") as f:
        f.write("modules:\n  edgeProxy: {enable: false}\n  edgeTunnel: {enable: false}\n"
                f"  edgeDNS:\n    cacheDNS: {{upstreamServers: {upstreams}}}\n")
    return path


def manifests(directory: str) -> str:
    mdir = os.path.join(directory, "manifests")
    os.makedirs(mdir, exist_ok=True)
    with open(os.path.join(mdir, "cluster.yaml"), "w", encoding="utf-8") as f:
        f.write(CLUSTER_YAML)
    return mdir


def dnsmasq_argv(port: int) -> list[str]:
    return ["dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
            "--listen-address=127.0.0.1", f"--port={port}", "--user=root", "--pid-file=",
            "--address=/example.test/192.0.2.1", "--local-ttl=300"]


def dig(server: str, port: int, name: str, qtype: str = "A", *extra: str,
        ns: Netns | None = None) -> tuple[str, list[str]]:
    """(status, ["TYPE rdata", ...]) of one dig query; status "TIMEOUT" if none came."""
    argv = ["dig", f"@{server}", "-p", str(port), name, qtype, "+tries=1", "+time=2",
            "+nocookie", *extra]
    run = ns.run(*argv, check=False) if ns else subprocess.run(argv, capture_output=True,
                                                               text=True, timeout=20)
    status, answers, section = "TIMEOUT", [], ""
    for line in run.stdout.splitlines():
        if "status:" in line:
            status = line.split("status:")[1].split(",")[0].strip()
        if line.startswith(";; ") and "SECTION" in line:
            section = line.split()[1]
        elif line and not line.startswith(";") and section == "ANSWER":
            fields = line.split()
            rdata = fields[4:6] if fields[3] == "SOA" else fields[4:]
            answers.append(" ".join([fields[3], *rdata]))
    return status, answers


@pytest.fixture(scope="module")
def agent(tmp_path_factory) -> Iterator[tuple[int, int, subprocess.Popen[bytes]]]:
    tmp = str(tmp_path_factory.mktemp("dns"))
    up_port, dns_port, admin_port = free_port(), free_port(), free_port()
    upstream = subprocess.Popen(dnsmasq_argv(up_port), stderr=subprocess.DEVNULL)
    proc = Proc(["agent", "--config", config_file(tmp, up_port), "--manifests", manifests(tmp),
                 "--dns-listen", f"127.0.0.1:{dns_port}", "--no-iptables",
                 "--admin", f"127.0.0.1:{admin_port}", "--state-dir", os.path.join(tmp, "s")])
    try:
        wait_ready(proc, f"127.0.0.1:{admin_port}")
        yield dns_port, up_port, upstream
    finally:
        proc.stop()
        upstream.terminate()
        upstream.wait()


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
@pytest.mark.parametrize("case", ANSWERABLE, ids=lambda c: c.id)
def test_spec_table_with_dig(agent, case: Case, transport: str) -> None:
    status, answers = dig("127.0.0.1", agent[0], case.name, case.qtype, transport)
    assert status == case.rcode
    assert sorted(answers) == sorted(case.answers)


def test_search_path_walk_probe_by_probe(agent) -> None:
    """A pod in testns (ndots:5, search testns.svc.cluster.local svc.cluster.local
    cluster.local) resolving web, web.testns and www.example.test."""
    port = agent[0]
    search = ["testns.svc.cluster.local", "svc.cluster.local", "cluster.local"]
    for short, expected in (("web", "A 10.96.0.10"), ("web.testns", "A 10.96.0.10"),
                            ("db-0.db", "A 172.17.0.2"), ("www.example.test", "A 192.0.2.1")):
        for candidate in [f"{short}.{s}" for s in search] + [short]:
            status, answers = dig("127.0.0.1", port, candidate, "A")
            if answers:
                assert answers == [expected], candidate
                break
            assert status == "NXDOMAIN", f"{candidate}: the walk must go on"
        else:
            pytest.fail(f"{short} did not resolve")


def test_forwarding_cache_and_upstream_down(agent) -> None:
    port, _, upstream = agent
    assert dig("127.0.0.1", port, "cached.example.test") == ("NOERROR", ["A 192.0.2.1"])
    assert dig("127.0.0.1", port, "cached.example.test", "A", "+tcp")[1] == ["A 192.0.2.1"]
    upstream.terminate()
    upstream.wait()
    assert dig("127.0.0.1", port, "cached.example.test") == ("NOERROR", ["A 192.0.2.1"])
    # +time=2: SERVFAIL must come before dig gives up (upstreamTimeout is 1 s)
    assert dig("127.0.0.1", port, "new.example.test")[0] == "SERVFAIL"
    assert dig("127.0.0.1", port, "web.testns.svc.cluster.local")[1] == ["A 10.96.0.10"]


@pytest.mark.netns
def test_agent_in_a_namespace_on_edgemesh0(lab: Lab, tmp_path) -> None:
    lan = lab.switch("lan")
    node = lab.host("node", lan, "192.168.50.2/24")
    other = lab.host("other", lan, "192.168.50.3/24")
    other.run("ip", "route", "add", "169.254.96.16/32", "via", "192.168.50.2")
    admin = "127.0.0.1:10557"
    proc = Proc(["agent", "--config", config_file(str(tmp_path), None), "--manifests",
                 manifests(str(tmp_path)), "--no-iptables", "--admin", admin,
                 "--state-dir", str(tmp_path / "s")], ns=node)
    etc = f"/etc/netns/{node.name}"
    try:
        wait_ready(proc, admin, ns=node)
        wait_for(lambda: node.run("curl", "-sf", f"http://{admin}/debug/dns",
                                  check=False).returncode == 0, what="the DNS module")
        assert "169.254.96.16/32" in node.run("ip", "addr", "show", "edgemesh0").stdout
        assert dig("169.254.96.16", 53, "web.testns.svc.cluster.local", ns=node) == \
            ("NOERROR", ["A 10.96.0.10"])
        assert dig("169.254.96.16", 53, "web.testns.svc.cluster.local", "A", "+tcp",
                   ns=node)[1] == ["A 10.96.0.10"]
        assert dig("169.254.96.16", 53, "web.testns.svc.cluster.local", "A", "+tcp",
                   "-b", "192.168.50.2", ns=node)[1] == ["A 10.96.0.10"]  # own address
        # another node: no UDP answer at all (no reflection), TCP refused
        assert dig("169.254.96.16", 53, "web.testns.svc.cluster.local", ns=other)[0] == "TIMEOUT"
        assert dig("169.254.96.16", 53, "web.testns.svc.cluster.local", "A", "+tcp",
                   ns=other)[0] == "REFUSED"
        # glibc's own search-path walk, as a pod with dnsPolicy ClusterFirst does it
        os.makedirs(etc, exist_ok=True)
        with open(f"{etc}/resolv.conf", "w", encoding="utf-8") as f:
            f.write("nameserver 169.254.96.16\nsearch testns.svc.cluster.local "
                    "svc.cluster.local cluster.local\noptions ndots:5\n")
        for name, ip in (("web", "10.96.0.10"), ("web.testns", "10.96.0.10"),
                         ("db-0.db", "172.17.0.2"), ("dual.testns.svc", "10.96.0.12")):
            out = node.run("getent", "ahostsv4", name, check=False)
            assert out.stdout.split()[:1] == [ip], f"{name}: {out.stdout}{out.stderr}"
        assert node.run("getent", "ahostsv4", "nope", check=False).returncode == 2
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        proc.stop()
    cleanup = node.run(*_edgemesh(), "cleanup", "--config",
                       config_file(str(tmp_path), None), check=False)
    assert cleanup.returncode == 0, cleanup.stderr
    assert node.run("ip", "link", "show", "edgemesh0", check=False).returncode != 0
    assert node.run(*_edgemesh(), "cleanup", check=False).returncode == 0  # idempotent


def _edgemesh() -> list[str]:
    from tests.procs import ROOT, edgemesh_argv
    return ["env", f"PYTHONPATH={ROOT}", *edgemesh_argv()]
