"""The hand parser, error answers, truncation, the upstream cache (RFC 2308) and client policy."""
from __future__ import annotations

import struct

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, DNSRecord

from edgemesh.dns import wire
from edgemesh.dns.cache import STALE_TTL, AnswerCache, cache_ttl
from edgemesh.dns.clients import ClientPolicy


def query(name: str = "web.testns.svc.cluster.local", qtype: str = "A", ident: int = 7,
          edns: EDNS0 | None = None) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = ident
    if edns is not None:
        q.add_ar(edns)
    return bytes(q.pack())


def test_parse_plain_query() -> None:
    q = wire.parse_query(query("Web.TestNS.svc.cluster.local", "AAAA"))
    assert q.id == 7 and q.qtype == QTYPE.AAAA and q.qclass == 1 and not q.edns
    assert q.labels == (b"Web", b"TestNS", b"svc", b"cluster", b"local")
    assert q.cache_key == (b"web.testns.svc.cluster.local", QTYPE.AAAA, 1, False)
    assert wire.udp_limit(q) == 512


def test_parse_edns() -> None:
    q = wire.parse_query(query(edns=EDNS0(udp_len=1200, flags="do")))
    assert q.edns and q.udp_size == 1200 and q.do and not q.has_options
    assert wire.udp_limit(q) == 1200
    big = wire.parse_query(query(edns=EDNS0(udp_len=4096)))
    assert big.udp_size == 1232  # a client's offer above 1232 is not taken (amplification)
    small = wire.parse_query(query(edns=EDNS0(udp_len=100)))
    assert small.udp_size == 512  # RFC 6891: values below 512 mean 512


@pytest.mark.parametrize("data, rcode", [
    (b"\x00\x01\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00", wire.FORMERR),  # two questions
    (b"\x00\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00", wire.FORMERR),  # none
    (b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03ab", wire.FORMERR),  # truncated
    (b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01", wire.FORMERR),
    (b"\x00\x01\x29\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01", wire.NOTIMP),
    (query() + b"junk", wire.FORMERR),
    (query(edns=EDNS0(version=1)), wire.BADVERS),
])
def test_malformed_queries_get_an_error_rcode(data: bytes, rcode: int) -> None:
    with pytest.raises(wire.FormatError) as e:
        wire.parse_query(data)
    assert e.value.hint == rcode
    reply = wire.error_reply(data, rcode)
    assert reply is not None and reply[:2] == data[:2] and reply[2] & 0x80
    msg = DNSRecord.parse(reply)
    full = msg.header.rcode | ((msg.ar[0].ttl >> 24) << 4 if msg.ar else 0)
    assert full == rcode


@pytest.mark.parametrize("data", [b"", b"\x00" * 11, bytes(DNSRecord.question("x").reply().pack())])
def test_non_queries_are_dropped(data: bytes) -> None:
    with pytest.raises(wire.Drop):
        wire.parse_query(data)
    assert wire.error_reply(data, wire.FORMERR) is None


def test_truncated_keeps_question_and_sets_tc() -> None:
    q = wire.parse_query(query(edns=EDNS0(udp_len=1232)))
    big = DNSRecord.parse(q.data).reply()
    for i in range(100):
        big.add_answer(*RR.fromZone(f"web.testns.svc.cluster.local. 30 A 10.0.{i}.1"))
    cut = DNSRecord.parse(wire.truncated(bytes(big.pack()), q))
    assert cut.header.tc and not cut.rr and cut.q.qname == "web.testns.svc.cluster.local"
    assert cut.ar[0].rtype == 41


def upstream_answer(text: str, rcode: int = 0, ident: int = 9) -> bytes:
    msg = DNSRecord.parse(query("www.example.test", "A", ident)).reply()
    msg.header.rcode = rcode
    for line in text.strip().splitlines():
        rr = RR.fromZone(line)[0]
        (msg.add_auth if rr.rtype == QTYPE.SOA else msg.add_answer)(rr)
    return bytes(msg.pack())


SOA = "example.test. 600 IN SOA ns.example.test. admin.example.test. 1 7200 1800 86400 120"


def test_cache_ttls_follow_rfc_2308() -> None:
    assert cache_ttl(upstream_answer("www.example.test. 300 A 192.0.2.1\n"
                                     "www.example.test. 60 A 192.0.2.2")) == 60
    assert cache_ttl(upstream_answer(SOA, rcode=RCODE.NXDOMAIN)) == 120  # min(SOA ttl, MINIMUM)
    assert cache_ttl(upstream_answer(SOA)) == 120  # NODATA
    assert cache_ttl(upstream_answer("", rcode=RCODE.NXDOMAIN)) == 0  # no SOA: not cached
    assert cache_ttl(upstream_answer("", rcode=RCODE.SERVFAIL)) == 0
    assert cache_ttl(upstream_answer("www.example.test. 0 A 192.0.2.1")) == 0


def test_cache_counts_ttls_down_and_serves_stale() -> None:
    cache = AnswerCache(10)
    key = (b"www.example.test", 1, 1, False)
    entry = cache.put(key, upstream_answer("www.example.test. 60 A 192.0.2.1"), now=100.0)
    assert entry is not None and entry.packet[:2] == b"\x00\x00"
    later = cache.get(key, 130.5)
    assert later is entry and later.fresh(130.5)
    assert DNSRecord.parse(later.render(130.5)).rr[0].ttl == 30
    assert not entry.fresh(161.0)
    assert DNSRecord.parse(entry.render(161.0, stale=True)).rr[0].ttl == STALE_TTL
    assert cache.get(key, 100.0 + 60 + cache.stale_for + 1) is None


def test_cache_is_bounded() -> None:
    cache = AnswerCache(3)
    packet = upstream_answer("www.example.test. 60 A 192.0.2.1")
    for i in range(5):
        cache.put(i, packet, 0.0)
    assert len(cache) == 3 and cache.get(0, 1.0) is None and cache.get(4, 1.0) is not None


def test_records_rejects_garbage() -> None:
    packet = upstream_answer("www.example.test. 60 A 192.0.2.1")
    with pytest.raises(wire.FormatError):
        list(wire.records(packet[:-3]))
    with pytest.raises(wire.FormatError):
        list(wire.records(packet[:12] + b"\xff" * 20))


def test_client_policy() -> None:
    policy = ClientPolicy(["10.20.0.0/16"], local=["192.168.10.2", "fe80::1"])
    assert policy.allowed("127.0.0.1") and policy.allowed("127.9.9.9") and policy.allowed("::1")
    assert policy.allowed("192.168.10.2") and policy.allowed("10.20.3.4")
    assert policy.allowed("::ffff:192.168.10.2") and policy.allowed("fe80::1")
    assert not policy.allowed("192.168.10.3") and not policy.allowed("8.8.8.8")
    assert not policy.allowed("not-an-ip")
    policy.set_local(["192.168.10.3"])
    assert policy.allowed("192.168.10.3") and not policy.allowed("192.168.10.2")


def test_make_query_round_trips() -> None:
    q = wire.parse_query(wire.make_query("www.example.test", QTYPE.AAAA))
    assert q.labels == (b"www", b"example", b"test") and q.qtype == QTYPE.AAAA and q.edns
    assert struct.unpack("!H", wire.with_id(q.data, 513)[:2])[0] == 513
