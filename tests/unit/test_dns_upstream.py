"""Forwarding over real loopback sockets: UDP, TCP on truncation, caching, failures, limits."""
from __future__ import annotations

import socket
import struct

import gevent
import pytest
from dnslib import RCODE, RR, DNSRecord

from edgemesh.dns import records
from edgemesh.dns.answers import Answerer
from edgemesh.dns.cache import STALE_TTL, AnswerCache
from edgemesh.dns.clients import ClientPolicy
from edgemesh.dns.server import DNSServer
from edgemesh.dns.upstream import Forwarder, parse_servers, servers_from_resolv_conf
from tests.unit.test_dns_zone import store_from_yaml


class FakeUpstream:
    """A UDP+TCP DNS server on loopback answering ``<n>.example.test`` with ``n`` A records."""

    def __init__(self, delay: float = 0.0, wrong_id_first: bool = False) -> None:
        for _ in range(20):  # one port free for both UDP and TCP
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", 0))
            self.port = self.udp.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        self.tcp.listen(8)
        self.delay, self.wrong_id_first = delay, wrong_id_first
        self.udp_queries: list[bytes] = []
        self.tcp_queries: list[bytes] = []
        self.greenlets = [gevent.spawn(self._serve_udp), gevent.spawn(self._serve_tcp)]

    def answer(self, data: bytes, limit: int) -> bytes:
        q = DNSRecord.parse(data)
        reply = q.reply()
        first = str(q.q.qname).split(".")[0]
        if first.isdigit():
            for i in range(int(first)):
                reply.add_answer(*RR.fromZone(f"{q.q.qname} 300 A 192.0.2.{i % 250 + 1}"))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(*RR.fromZone("example.test. 600 SOA ns.example.test. a.example.test. "
                                        "1 7200 1800 86400 60"))
        packet = bytes(reply.pack())
        if len(packet) > limit:
            reply.rr = []
            reply.header.tc = 1
            packet = bytes(reply.pack())
        return packet

    def _serve_udp(self) -> None:
        while True:
            data, addr = self.udp.recvfrom(4096)
            self.udp_queries.append(data)
            gevent.spawn(self._reply_udp, data, addr)

    def _reply_udp(self, data: bytes, addr: tuple[str, int]) -> None:
        gevent.sleep(self.delay)
        if self.wrong_id_first:
            self.udp.sendto(b"\xff\xff" + self.answer(data, 512)[2:], addr)
        self.udp.sendto(self.answer(data, 512), addr)

    def _serve_tcp(self) -> None:
        while True:
            conn, _ = self.tcp.accept()
            length = struct.unpack("!H", conn.recv(2))[0]
            data = conn.recv(length)
            self.tcp_queries.append(data)
            out = self.answer(data, 65535)
            conn.sendall(struct.pack("!H", len(out)) + out)
            conn.close()

    def close(self) -> None:
        gevent.killall(self.greenlets)
        self.udp.close()
        self.tcp.close()


@pytest.fixture
def upstream():
    up = FakeUpstream()
    yield up
    up.close()


def ask(name: str, qtype: str = "A") -> bytes:
    return bytes(DNSRecord.question(name, qtype).pack())


def test_forwarder_udp_and_tcp_on_truncation(upstream: FakeUpstream) -> None:
    fwd = Forwarder([("127.0.0.1", upstream.port)], timeout=2.0)
    small = DNSRecord.parse(fwd.ask(ask("2.example.test"), "k1"))  # type: ignore[arg-type]
    assert len(small.rr) == 2 and not upstream.tcp_queries
    big = DNSRecord.parse(fwd.ask(ask("60.example.test"), "k2"))  # type: ignore[arg-type]
    assert len(big.rr) == 60 and len(upstream.tcp_queries) == 1


def test_forwarder_ignores_answers_with_the_wrong_id() -> None:
    up = FakeUpstream(wrong_id_first=True)
    try:
        fwd = Forwarder([("127.0.0.1", up.port)], timeout=2.0)
        answer = fwd.ask(ask("1.example.test"), "k")
        assert answer is not None and DNSRecord.parse(answer).rr
    finally:
        up.close()


def test_forwarder_gives_up_on_a_dead_upstream() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))  # bound, never answers: a timeout, not a refusal
        fwd = Forwarder([("127.0.0.1", s.getsockname()[1])], timeout=0.3)
        assert fwd.ask(ask("1.example.test"), "k") is None
    fwd = Forwarder([("127.0.0.1", 9)], timeout=5.0)  # nothing listens: refused, quickly
    assert fwd.ask(ask("1.example.test"), "k") is None


def test_forwarder_coalesces_and_bounds_outstanding() -> None:
    up = FakeUpstream(delay=0.3)
    try:
        fwd = Forwarder([("127.0.0.1", up.port)], timeout=2.0, max_outstanding=2)
        same = [gevent.spawn(fwd.ask, ask("1.example.test"), "same") for _ in range(5)]
        others = [gevent.spawn(fwd.ask, ask(f"{i}.example.test"), i) for i in (2, 3)]
        gevent.joinall(same + others, timeout=5)
        assert all(g.value is not None for g in same)
        assert len(up.udp_queries) == 2  # "same" once, one more; the third was refused
        assert sum(g.value is None for g in others) == 1
    finally:
        up.close()


def test_parse_servers_and_resolv_conf(tmp_path) -> None:
    assert parse_servers(["1.2.3.4", "127.0.0.1:5353", "[::1]:53", "fd00::1"]) == [
        ("1.2.3.4", 53), ("127.0.0.1", 5353), ("::1", 53), ("fd00::1", 53)]
    conf = tmp_path / "resolv.conf"
    conf.write_text("search x\nnameserver 169.254.96.16\nnameserver 10.0.0.2\n")
    assert servers_from_resolv_conf(str(conf)) == [("169.254.96.16", 53), ("10.0.0.2", 53)]
    assert servers_from_resolv_conf(str(tmp_path / "missing")) == []


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_server(port: int, clock: Clock | None = None, timeout: float = 1.0) -> DNSServer:
    store = store_from_yaml()
    answerer = Answerer(lambda: records.zone_data_from(store, "cluster.local", 30, 1),
                        AnswerCache(100), clock=clock)
    srv = DNSServer("127.0.0.1", 0, answerer, Forwarder([("127.0.0.1", port)], timeout),
                    ClientPolicy())
    srv.start()
    return srv


def test_server_forwards_caches_and_serves_stale(upstream: FakeUpstream) -> None:
    clock = Clock()
    srv = make_server(upstream.port, clock)
    try:
        q = DNSRecord.question("3.example.test", "A")
        for _ in range(3):
            msg = DNSRecord.parse(q.send("127.0.0.1", srv.port, timeout=5))
            assert len(msg.rr) == 3 and msg.header.id == q.header.id
        assert len(upstream.udp_queries) == 1  # the rest came from the cache
        clock.now += 100
        assert DNSRecord.parse(q.send("127.0.0.1", srv.port, timeout=5)).rr[0].ttl == 200
        nx = DNSRecord.question("nothing.example.test", "A")
        for _ in range(2):
            msg = DNSRecord.parse(nx.send("127.0.0.1", srv.port, timeout=5))
            assert msg.header.rcode == RCODE.NXDOMAIN and msg.auth
        assert len(upstream.udp_queries) == 2  # the negative answer was cached (RFC 2308)
        upstream.close()  # upstream down: cached answers still served, new names SERVFAIL
        assert len(DNSRecord.parse(q.send("127.0.0.1", srv.port, timeout=5)).rr) == 3
        new = DNSRecord.question("4.example.test", "A")
        assert DNSRecord.parse(new.send("127.0.0.1", srv.port, timeout=5)).header.rcode == \
            RCODE.SERVFAIL
        clock.now += 1000  # expired: served stale, with a short TTL, while the upstream is down
        stale = DNSRecord.parse(q.send("127.0.0.1", srv.port, tcp=True, timeout=5))
        assert len(stale.rr) == 3 and stale.rr[0].ttl == STALE_TTL
    finally:
        srv.stop()


def test_server_truncates_for_udp_and_answers_whole_over_tcp(upstream: FakeUpstream) -> None:
    srv = make_server(upstream.port)
    try:
        q = DNSRecord.question("60.example.test", "A")
        udp = q.send("127.0.0.1", srv.port, timeout=5)
        assert len(udp) <= 512 and DNSRecord.parse(udp).header.tc
        tcp = DNSRecord.parse(q.send("127.0.0.1", srv.port, tcp=True, timeout=5))
        assert len(tcp.rr) == 60 and not tcp.header.tc
    finally:
        srv.stop()


def test_server_survives_garbage_and_answers_formerr(upstream: FakeUpstream) -> None:
    srv = make_server(upstream.port)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(5)
            for junk in (b"", b"\x00", b"\x12\x34" + b"\xff" * 40):
                c.sendto(junk, ("127.0.0.1", srv.port))
            c.sendto(b"\x12\x34\x01\x00\x00\x02" + b"\x00" * 6, ("127.0.0.1", srv.port))
            reply = c.recv(512)
            assert reply[:2] == b"\x12\x34" and reply[3] & 0xF == RCODE.FORMERR
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as t:
            t.sendall(b"\x00\x05hello")
            assert t.recv(100) == b""  # not a query: closed
        q = DNSRecord.question("web.testns.svc.cluster.local", "A")
        assert DNSRecord.parse(q.send("127.0.0.1", srv.port, timeout=5)).rr
    finally:
        srv.stop()


def test_server_refuses_other_clients(upstream: FakeUpstream) -> None:
    store = store_from_yaml()
    answerer = Answerer(lambda: records.zone_data_from(store, "cluster.local", 30, 1), None)
    policy = ClientPolicy()
    policy.memo["127.0.0.1"] = False  # as if loopback were another node
    srv = DNSServer("127.0.0.1", 0, answerer, Forwarder([]), policy)
    srv.start()
    try:
        q = DNSRecord.question("web.testns.svc.cluster.local", "A")
        with pytest.raises(socket.timeout):
            q.send("127.0.0.1", srv.port, timeout=0.5)  # UDP: dropped, no reflection
        assert DNSRecord.parse(q.send("127.0.0.1", srv.port, tcp=True, timeout=5)).header.rcode \
            == RCODE.REFUSED
    finally:
        srv.stop()
