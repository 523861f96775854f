"""dnslib (0.9 MB with calendar) is imported by the first answer built, never by an idle agent.

The DNS modules write dnslib's QTYPE/RCODE numbers out instead of importing them; these tests
keep the numbers equal to dnslib's and check, in a fresh interpreter, that loading the DNS module
does not import dnslib while answering a query does (and answers right).
"""
from __future__ import annotations

import subprocess
import sys

from dnslib import QTYPE, RCODE, DNSRecord

from edgemesh.dns import wire, zone
from tests.procs import ROOT


def test_written_out_numbers_are_dnslibs() -> None:
    assert (zone.T_A, zone.T_AAAA, zone.T_SRV, zone.T_PTR, zone.T_CNAME) == (
        QTYPE.A, QTYPE.AAAA, QTYPE.SRV, QTYPE.PTR, QTYPE.CNAME)
    assert (zone.T_TXT, zone.T_SOA, zone.T_NS, zone.T_ANY) == (
        QTYPE.TXT, QTYPE.SOA, QTYPE.NS, QTYPE.ANY)
    assert (zone.NOERROR, zone.NXDOMAIN, zone.SERVFAIL) == (
        RCODE.NOERROR, RCODE.NXDOMAIN, RCODE.SERVFAIL)
    assert wire.type_name(QTYPE.AAAA) == "AAAA" and wire.type_name(64000) == "other"
    assert wire.rcode_name(RCODE.NXDOMAIN) == "NXDOMAIN" and wire.rcode_name(99) == "other"


LOAD_THEN_ANSWER = """
import sys
import edgemesh.dns.module
from edgemesh.dns import wire, zone
svc = zone.ServiceRecord("web", "default", zone.ServiceKind.CLUSTER_IP, ips=("10.96.0.10",))
data = zone.ZoneData("cluster.local", namespaces=frozenset({"default"}),
                     services={("default", "web"): svc})
print("dnslib" in sys.modules)
query = wire.parse_query(wire.make_query("web.default.svc.cluster.local", zone.T_A))
sys.stdout.write(wire.pack_reply(query, zone.resolve(data, query.name_text, query.qtype)).hex())
"""


def test_loading_the_dns_module_does_not_import_dnslib_answering_does() -> None:
    r = subprocess.run([sys.executable, "-c", LOAD_THEN_ANSWER], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    loaded_before, packet = r.stdout.split("\n")
    assert loaded_before == "False"
    answer = DNSRecord.parse(bytes.fromhex(packet))
    assert answer.header.rcode == RCODE.NOERROR
    assert [str(rr.rdata) for rr in answer.rr] == ["10.96.0.10"]
