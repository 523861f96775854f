"""Arbitrary bytes into the DNS hand parser and the answerer: an answer, FORMERR or nothing,
never an exception; and whatever is answered over UDP fits the client's limit."""
from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgemesh.dns import records, wire
from edgemesh.dns.answers import Answerer, Forward
from edgemesh.dns.cache import AnswerCache
from tests.unit.test_dns_zone import store_from_yaml

STORE = store_from_yaml()
ANSWERER = Answerer(lambda: records.zone_data_from(STORE, "cluster.local", 30, 1), AnswerCache(50),
                    exact_size=50)

labels = st.sampled_from([b"web", b"db", b"db-0", b"testns", b"svc", b"pod", b"cluster",
                          b"local", b"_http", b"_tcp", b"in-addr", b"arpa", b"10", b"*",
                          b"WEB", b"\x00", b"a.b", b"\xff"])


@st.composite
def near_queries(draw) -> bytes:
    """Mostly well-formed queries with random names, types, flags and EDNS, then mutated."""
    names = draw(st.lists(labels, max_size=8))
    qname = b"".join(bytes([len(x)]) + x for x in names) + b"\x00"
    header = struct.pack("!6H", draw(st.integers(0, 65535)), draw(st.integers(0, 65535)) & 0x7FFF,
                         1, 0, 0, draw(st.integers(0, 1)))
    body = qname + struct.pack("!HH", draw(st.integers(0, 300)), draw(st.sampled_from([1, 3, 255])))
    if header[-1]:
        body += b"\x00" + struct.pack("!HHBBHH", 41, draw(st.integers(0, 5000)), 0,
                                      draw(st.integers(0, 1)), draw(st.integers(0, 65535)), 0)
    data = bytearray(header + body)
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)


def check(data: bytes) -> None:
    try:
        q: wire.Query | None = wire.parse_query(data)
    except (wire.FormatError, wire.Drop):
        q = None
    out = ANSWERER.answer(data, udp=True)
    if isinstance(out, Forward):
        out = ANSWERER.forwarded(out, None)
    if out is None:
        return
    assert out[:2] == data[:2] and out[2] & 0x80, "answers carry the ID and QR"
    limit = wire.udp_limit(q) if q is not None else 512
    assert len(out) <= limit
    list(wire.records(out))  # what we send is well-formed (dnslib rejects 8-bit labels)
    assert ANSWERER.cached(data) in (None, out)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_queries())
def test_near_queries_never_crash(data: bytes) -> None:
    check(data)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    check(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_response_walker_raises_only_format_errors(data: bytes) -> None:
    try:
        list(wire.records(data))
    except wire.FormatError:
        pass
