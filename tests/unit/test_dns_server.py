"""The UDP loops over real loopback sockets: bursts that arrive as one batch, answered right.

Both loops are run (``batched``: recvmmsg/sendmmsg; not: one datagram at a time) against the
same bursts: several clients, repeated and new questions, a client that is not allowed, and
upstream answers from the cache, all in one batch; every answer goes to its own client with its
own ID, and the counters count every answer the fast path gave.
"""
from __future__ import annotations

import socket

import pytest
from dnslib import RCODE, DNSRecord

from edgemesh.dns import mmsg, records
from edgemesh.dns.answers import CACHE_HITS, REQUESTS, Answerer
from edgemesh.dns.cache import AnswerCache
from edgemesh.dns.clients import ClientPolicy
from edgemesh.dns.server import NOT_ALLOWED, DNSServer
from edgemesh.dns.upstream import Forwarder
from tests.unit.test_dns_upstream import FakeUpstream
from tests.unit.test_dns_zone import store_from_yaml

WEB = "web.testns.svc.cluster.local"
LOOPS = [pytest.param(True, id="batched"), pytest.param(False, id="one-by-one")]


@pytest.fixture
def upstream():
    up = FakeUpstream()
    yield up
    up.close()


def serve(batched: bool, upstream_port: int, host: str = "127.0.0.1",
          policy: ClientPolicy | None = None) -> DNSServer:
    store = store_from_yaml()
    answerer = Answerer(lambda: records.zone_data_from(store, "cluster.local", 30, 1),
                        AnswerCache(100))
    srv = DNSServer(host, 0, answerer, Forwarder([("127.0.0.1", upstream_port)], 2.0),
                    policy or ClientPolicy(), batched=batched)
    srv.start()
    return srv


def client(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(5)
    return s


def query(name: str, ident: int, qtype: str = "A") -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = ident
    return bytes(q.pack())


def answers(sock: socket.socket, count: int) -> dict[int, DNSRecord]:
    out = {}
    for _ in range(count):
        msg = DNSRecord.parse(sock.recv(4096))
        out[msg.header.id] = msg
    return out


def counts() -> tuple[float, float, float, float]:
    return (REQUESTS.labels("A", "NOERROR").value, CACHE_HITS.labels("zone").value,
            CACHE_HITS.labels("upstream").value, NOT_ALLOWED.labels("udp").value)


def test_batches_are_available_here() -> None:
    assert mmsg.available()  # else the batched cases below test the fallback twice


@pytest.mark.parametrize("batched", LOOPS)
def test_a_burst_from_several_clients_is_answered_and_counted(upstream: FakeUpstream,
                                                               batched: bool) -> None:
    srv = serve(batched, upstream.port)
    clients = [client() for _ in range(3)]
    try:
        first = clients[0]
        first.sendto(query(WEB, 1), ("127.0.0.1", srv.port))  # now cached in `exact`
        assert answers(first, 1)[1].rr
        first.sendto(query("2.example.test", 2), ("127.0.0.1", srv.port))  # upstream cache
        assert len(answers(first, 1)[2].rr) == 2
        first.sendto(query("2.example.test", 3), ("127.0.0.1", srv.port))  # upstream_exact
        assert len(answers(first, 1)[3].rr) == 2
        before = counts()
        # one burst, sent without yielding: the server finds it all queued at once
        for i in range(40):
            for c, sock in enumerate(clients):
                ident = 1000 * c + i
                name = WEB if i % 2 else "2.example.test"
                sock.sendto(query(name, ident), ("127.0.0.1", srv.port))
        for c, sock in enumerate(clients):
            got = answers(sock, 40)
            assert sorted(got) == [1000 * c + i for i in range(40)]
            for ident, msg in got.items():
                assert str(msg.q.qname).rstrip(".") == (WEB if ident % 2 else "2.example.test")
                assert msg.header.rcode == RCODE.NOERROR and msg.rr
        after = counts()
        assert after[0] - before[0] == 120  # every answer counted by type and rcode
        assert after[1] - before[1] == 60  # zone answers from `exact`
        assert after[2] - before[2] == 60  # upstream answers from the cache
        assert len(upstream.udp_queries) == 1
    finally:
        for sock in clients:
            sock.close()
        srv.stop()


@pytest.mark.parametrize("batched", LOOPS)
def test_a_batch_mixing_hits_misses_and_strangers(upstream: FakeUpstream, batched: bool) -> None:
    """Skipped datagrams shift the answers' send slots; each still reaches its own client."""
    policy = ClientPolicy()
    policy.memo["127.0.0.2"] = False  # as if 127.0.0.2 were another node
    srv = serve(batched, upstream.port, policy=policy)
    ours, stranger = client(), client("127.0.0.2")
    try:
        ours.sendto(query(WEB, 1), ("127.0.0.1", srv.port))
        answers(ours, 1)
        before = counts()
        names = {}
        for i in range(30):
            stranger.sendto(query(WEB, 5000 + i), ("127.0.0.1", srv.port))
            if i % 3 == 0:  # new questions (the zone's, no `exact` entry yet) and junk
                names[100 + i] = f"nope{i}.testns.svc.cluster.local"
                ours.sendto(query(names[100 + i], 100 + i), ("127.0.0.1", srv.port))
                ours.sendto(b"\x00\x07\x01\x00\x00\x02" + b"\x00" * 6, ("127.0.0.1", srv.port))
            ours.sendto(query(WEB, 200 + i), ("127.0.0.1", srv.port))
        got: dict[int, bytes] = {}
        for _ in range(30 + 10 + 10):
            data = ours.recv(4096)
            got.setdefault(int.from_bytes(data[:2], "big"), data)
        assert set(got) == {7} | {200 + i for i in range(30)} | set(names)
        assert got[7][3] & 0xF == RCODE.FORMERR
        for i in range(30):
            msg = DNSRecord.parse(got[200 + i])
            assert msg.rr and str(msg.q.qname).rstrip(".") == WEB
        for ident, name in names.items():
            msg = DNSRecord.parse(got[ident])
            assert str(msg.q.qname).rstrip(".") == name and msg.header.rcode == RCODE.NXDOMAIN
        stranger.settimeout(0.3)
        with pytest.raises(socket.timeout):
            stranger.recv(4096)  # never an answer to a stranger
        after = counts()
        assert after[3] - before[3] == 30
        assert after[1] - before[1] == 30
        assert after[0] - before[0] == 30
    finally:
        ours.close()
        stranger.close()
        srv.stop()


@pytest.mark.parametrize("batched", LOOPS)
def test_ipv6_listener_answers_bursts(upstream: FakeUpstream, batched: bool) -> None:
    try:
        srv = serve(batched, upstream.port, host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    sock = client("::1")
    try:
        for i in range(50):
            sock.sendto(query(WEB, i), ("::1", srv.port))
        got = answers(sock, 50)
        assert sorted(got) == list(range(50)) and all(m.rr for m in got.values())
    finally:
        sock.close()
        srv.stop()


def spelled(name: str, seed: int) -> str:
    """``name`` with its letters' case chosen by the bits of ``seed`` (a 0x20 client)."""
    return "".join(ch.upper() if (seed >> (i % 24)) & 1 else ch for i, ch in enumerate(name))


@pytest.mark.parametrize("batched", LOOPS)
def test_mixed_case_questions_take_the_fast_path_in_their_own_case(upstream: FakeUpstream,
                                                                    batched: bool) -> None:
    """RFC 4343 / 0x20: a question that differs only in case is answered from ``folded``
    (counted as a zone hit, no new ``exact`` entry) with the client's spelling in the question
    and in the answer's owner name; another type or name is not mistaken for it."""
    srv = serve(batched, upstream.port)
    sock = client()
    try:
        sock.sendto(query(WEB, 1), ("127.0.0.1", srv.port))
        first = answers(sock, 1)[1]
        entries = len(srv.answerer.exact)
        before = counts()
        asked = {10 + i: spelled(WEB, 0x5A5A5A * (i + 1) + i) for i in range(20)}
        for ident, name in asked.items():
            sock.sendto(query(name, ident), ("127.0.0.1", srv.port))
        got = answers(sock, len(asked))
        for ident, name in asked.items():
            msg = got[ident]
            assert str(msg.q.qname).rstrip(".") == name  # byte for byte, case included
            assert str(msg.rr[0].rname).rstrip(".") == name
            assert [str(r.rdata) for r in msg.rr] == [str(r.rdata) for r in first.rr]
        after = counts()
        assert after[1] - before[1] == len(asked)  # all from the fast path
        assert after[0] - before[0] == len(asked)
        assert len(srv.answerer.exact) == entries
        sock.sendto(query(WEB.upper(), 50, "AAAA"), ("127.0.0.1", srv.port))
        assert answers(sock, 1)[50].q.qtype == 28  # not the A answer
    finally:
        sock.close()
        srv.stop()


def test_only_the_name_is_folded() -> None:
    """Type 97 is 0x0061 ("a"), HTTPS (65) is 0x0041 ("A"): lowering a whole query would make
    them one key, so a query with a letter outside its name is never remembered in ``folded``
    (it is answered by the slow path, right)."""
    store = store_from_yaml()
    answerer = Answerer(lambda: records.zone_data_from(store, "cluster.local", 30, 1), None)
    answerer.answer(query(WEB, 1, "TYPE97"))
    answerer.answer(query(WEB, 2, "HTTPS"))
    assert not answerer.folded
    assert answerer.cached(query(WEB.upper(), 3, "HTTPS")) is None
    got = DNSRecord.parse(answerer.answer(query(WEB.upper(), 4, "HTTPS")))
    assert got.q.qtype == 65 and str(got.q.qname).rstrip(".") == WEB.upper()
    answerer.answer(query(WEB, 5, "AAAA"))
    assert len(answerer.folded) == 1
