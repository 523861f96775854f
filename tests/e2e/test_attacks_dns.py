"""DNS attacks (issue 18): reflection from another host, amplification with ANY and large
answers, and a flood from off the node that must not delay the node's own clients.

The agent in a namespace on 169.254.96.16:53 (edgemesh0) with a dnsmasq upstream holding a
~2.5 KB TXT answer; another host on the LAN routes 169.254.96.16 through the node (a
neighbour can always do that: Linux accepts packets for any of its addresses on any link).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.e2e.meshlab import metric
from tests.e2e.test_dns import dig, manifests
from tests.netlab import wait_for
from tests.procs import Proc, wait_ready

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(not (shutil.which("dig") and shutil.which("dnsmasq")),
                                 reason="needs dig and dnsmasq")]

DNS = "169.254.96.16"
ADMIN = "127.0.0.1:10582"
UPSTREAM_PORT = 5399
ZONE_NAME = "web.testns.svc.cluster.local"

# (name, qtype, transport, EDNS size or 0) -> query bytes, answer bytes, TC, rcode, answers
SIZES = textwrap.dedent("""
    import json, socket, struct, sys
    from dnslib import DNSRecord, EDNS0, QTYPE
    out = []
    for name, qtype, tcp, edns in json.loads(sys.argv[1]):
        q = DNSRecord.question(name, qtype)
        if edns:
            q.add_ar(EDNS0(udp_len=edns))
        data = bytes(q.pack())
        if tcp:
            s = socket.create_connection((sys.argv[2], 53), timeout=5)
            s.sendall(struct.pack("!H", len(data)) + data)
            head = s.recv(2, socket.MSG_WAITALL)
            reply = s.recv(struct.unpack("!H", head)[0], socket.MSG_WAITALL)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
            s.sendto(data, (sys.argv[2], 53)); reply = s.recv(65535)
        r = DNSRecord.parse(reply)
        out.append({"name": name, "qtype": qtype, "tcp": tcp, "edns": edns,
                    "query": len(data), "answer": len(reply), "tc": r.header.tc,
                    "rcode": r.header.rcode, "answers": [QTYPE[a.rtype] for a in r.rr]})
    print(json.dumps(out))
""")

# the node's own client: N queries one after another, median and worst latency, timeouts
LATENCY = textwrap.dedent("""
    import socket, statistics, sys, time
    from dnslib import DNSRecord
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    lat, lost = [], 0
    for i in range(int(sys.argv[3])):
        q = DNSRecord.question(sys.argv[2], "A"); q.header.id = i
        t = time.perf_counter(); s.sendto(bytes(q.pack()), (sys.argv[1], 53))
        try:
            while DNSRecord.parse(s.recv(4096)).header.id != i:
                pass
            lat.append(time.perf_counter() - t)
        except socket.timeout:
            lost += 1
    print(statistics.median(lat) * 1e3, lost)
""")

# off the node: queries as fast as one process sends them, for SECONDS; prints how many were
# sent and how many answers came back (must be none: no reflection)
FLOOD = textwrap.dedent("""
    import socket, sys, time
    from dnslib import DNSRecord, EDNS0
    q = DNSRecord.question(sys.argv[2], "ANY"); q.add_ar(EDNS0(udp_len=4096))
    data = bytes(q.pack())
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
    sent, got, end = 0, 0, time.monotonic() + float(sys.argv[3])
    while time.monotonic() < end:
        for _ in range(100):
            try:
                s.sendto(data, (sys.argv[1], 53)); sent += 1
            except BlockingIOError:
                pass
        try:
            while s.recv(65535):
                got += 1
        except BlockingIOError:
            pass
    time.sleep(0.5)
    try:
        while s.recv(65535):
            got += 1
    except BlockingIOError:
        pass
    print(sent, got)
""")


@pytest.fixture(scope="module")
def dns_lab(module_lab):
    lab, tmp = module_lab
    lan = lab.switch("lan")
    node = lab.host("node", lan, "192.168.51.2/24")
    other = lab.host("other", lan, "192.168.51.3/24")
    other.run("ip", "route", "add", f"{DNS}/32", "via", "192.168.51.2")
    txt = ["--txt-record=big.example.test," + f"{i:02d}" + "x" * 240 for i in range(10)]
    node.popen(["dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
                "--listen-address=127.0.0.1", f"--port={UPSTREAM_PORT}", "--user=root",
                "--pid-file=", "--address=/example.test/192.0.2.1", "--local-ttl=300", *txt])
    config = os.path.join(tmp, "agent.yaml")
    with open(config, "w", encoding="utf-8") as f:
        f.write("modules:\n  edgeProxy: {enable: false}\n  edgeTunnel: {enable: false}\n"
                f"  edgeDNS:\n    cacheDNS: {{upstreamServers: ['127.0.0.1:{UPSTREAM_PORT}']}}\n")
    proc = Proc(["agent", "--config", config, "--manifests", manifests(tmp), "--no-iptables",
                 "--admin", ADMIN, "--state-dir", os.path.join(tmp, "s")], ns=node)
    wait_ready(proc, ADMIN, ns=node)
    wait_for(lambda: dig(DNS, 53, ZONE_NAME, ns=node)[0] == "NOERROR", timeout=20,
             what="the agent's DNS on edgemesh0")
    yield lab, node, other, proc
    proc.stop()


def _metrics(node) -> str:
    return node.run("curl", "-s", f"http://{ADMIN}/metrics").stdout


def test_another_host_gets_no_answer_for_forwarded_or_cluster_names_counted(dns_lab) -> None:
    _, node, other, _ = dns_lab
    before = _metrics(node)
    for name in ("anything.example.test", ZONE_NAME):
        for qtype in ("A", "ANY"):
            assert dig(DNS, 53, name, qtype, "+notcp", ns=other)[0] == "TIMEOUT"  # UDP: dropped
            assert dig(DNS, 53, name, qtype, "+tcp", ns=other)[0] == "REFUSED"
    after = _metrics(node)
    for transport in ("udp", "tcp"):
        delta = (metric(after, "edgemesh_dns_not_allowed_total", transport=transport)
                 - metric(before, "edgemesh_dns_not_allowed_total", transport=transport))
        assert delta == 4, (transport, delta)
    # the same names from the node itself: answered
    assert dig(DNS, 53, "anything.example.test", ns=node) == ("NOERROR", ["A 192.0.2.1"])


def test_any_is_minimal_and_udp_answers_stay_within_1232_bytes(dns_lab) -> None:
    _, node, _, _ = dns_lab
    before = metric(_metrics(node), "edgemesh_dns_any_minimal_total")
    asks = [("example.test", "ANY", False, 4096), ("example.test", "ANY", False, 0),
            ("big.example.test", "TXT", False, 4096), ("big.example.test", "TXT", False, 0),
            ("big.example.test", "TXT", True, 0), (ZONE_NAME, "ANY", False, 4096)]
    rows = json.loads(node.run(sys.executable, "-c", SIZES, json.dumps(asks), DNS).stdout)
    table = "\n".join(f"{r['qtype']:4} {r['name']:30} {'tcp' if r['tcp'] else 'udp'} "
                      f"edns={r['edns']:<5} {r['query']:4} -> {r['answer']:5} B "
                      f"x{r['answer'] / r['query']:5.1f} tc={r['tc']} {r['answers']}"
                      for r in rows)
    print(table)
    any_fwd, any_plain, big_edns, big_plain, big_tcp, any_zone = rows
    assert any_fwd["answers"] == ["HINFO"] and any_plain["answers"] == ["HINFO"], table
    assert any_fwd["answer"] / any_fwd["query"] < 2.5, table  # the question + one 39-byte HINFO
    assert metric(_metrics(node), "edgemesh_dns_any_minimal_total") - before == 2
    assert big_edns["tc"] and big_edns["answer"] <= 1232, table  # a 4096 offer not taken
    assert big_plain["tc"] and big_plain["answer"] <= 512, table
    assert not big_tcp["tc"] and big_tcp["answer"] > 2000, table  # whole over TCP
    assert any_zone["answers"] == ["A"], table  # the zone's own records, nothing forwarded
    for r in rows:
        if not r["tcp"]:
            assert r["answer"] / r["query"] < 30, table  # 1232 / the smallest query


def test_a_flood_from_another_host_does_not_delay_the_node_s_own_client(dns_lab) -> None:
    _, node, other, _ = dns_lab
    calm_ms, lost = node.run(sys.executable, "-c", LATENCY, DNS, ZONE_NAME, "300").stdout.split()
    assert lost == "0"
    before = metric(_metrics(node), "edgemesh_dns_not_allowed_total", transport="udp")
    flood = other.popen([sys.executable, "-c", FLOOD, DNS, "example.test", "6"],
                        stdout=subprocess.PIPE)
    busy_ms, busy_lost = node.run(sys.executable, "-c", LATENCY, DNS, ZONE_NAME,
                                  "300").stdout.split()
    sent, answered = (int(x) for x in flood.communicate(timeout=30)[0].split())
    dropped = metric(_metrics(node), "edgemesh_dns_not_allowed_total", transport="udp") - before
    ratio = float(busy_ms) / float(calm_ms)
    print(f"flood: {sent} queries sent, {answered} answered, {dropped:.0f} counted; own client "
          f"median {calm_ms} ms calm, {busy_ms} ms under the flood (x{ratio:.2f}), "
          f"{busy_lost} lost")
    assert answered == 0 and sent > 1000
    assert dropped > 0.2 * sent  # counted (the rest the kernel dropped from a full buffer)
    assert busy_lost == "0"
    assert ratio < 4, ratio
