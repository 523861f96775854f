"""DNS wire format, sans-IO: the hand parser of queries and the packing of answers.

The hot path never builds a dnslib object: ``parse_query`` reads the header, the one question
and an EDNS0 OPT record by hand, and answers are packed once and reused (see ``answers``).
dnslib packs an answer only the first time a question is seen.

Untrusted bytes: every malformed query raises ``FormatError`` (answer FORMERR) or ``Drop``
(not a query at all: answer nothing), never anything else.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgemesh.dns.zone import Reply
from edgemesh.errors import RemoteProtocolError

if TYPE_CHECKING:
    from dnslib import EDNS0

OUR_UDP_SIZE = 1232  # what we advertise in our OPT record (DNS flag day 2020)
MAX_UDP = OUR_UDP_SIZE  # larger answers go TC over UDP, whatever the client offers (BIND's
# max-udp-size since 9.16): bounds what a spoofed query can reflect, and avoids fragments
T_OPT = 41
FLAG_QR, FLAG_AA, FLAG_TC, FLAG_RD, FLAG_RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080
FLAG_CD = 0x0010
OPCODE_MASK = 0x7800
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16


class Drop(RemoteProtocolError):
    """Not a query (a response, or shorter than a header): answer nothing."""


class FormatError(RemoteProtocolError):
    """A malformed query; ``hint`` is the rcode to answer with (FORMERR, NOTIMP, BADVERS)."""


@dataclass(slots=True)
class Query:
    """One parsed query: the header fields we need, the question, and EDNS0."""
    data: bytes
    id: int
    flags: int
    labels: tuple[bytes, ...]
    qend: int  # offset just after the question
    qtype: int
    qclass: int
    edns: bool = False
    udp_size: int = 512  # the most the client accepts over UDP
    do: bool = False
    has_options: bool = False  # the OPT record carries options (cookies, ECS, ...)

    @property
    def question(self) -> bytes:
        return self.data[12:self.qend]

    @property
    def name_text(self) -> list[str]:
        return [label.decode("latin-1") for label in self.labels]

    @property
    def cache_key(self) -> tuple[bytes, int, int, bool]:
        """Case-insensitive identity of the question (for the upstream cache)."""
        return (b".".join(self.labels).lower(), self.qtype, self.qclass, self.do)

    @property
    def type_name(self) -> str:
        return type_name(self.qtype)


# dnslib's mnemonics, filled on the first query: an idle agent never imports dnslib (0.9 MB)
_TYPE_NAMES: dict[int, str] = {}
_RCODE_NAMES: dict[int, str] = {}


def _load_names() -> None:
    from dnslib import QTYPE, RCODE

    _RCODE_NAMES.update((int(k), str(v)) for k, v in RCODE.forward.items())
    _TYPE_NAMES.update((int(k), str(v)) for k, v in QTYPE.forward.items())


def type_name(qtype: int) -> str:
    """A bounded label value for metrics: the mnemonic, or "other"."""
    if not _TYPE_NAMES:
        _load_names()
    return _TYPE_NAMES.get(qtype, "other")


def rcode_name(rcode: int) -> str:
    if not _RCODE_NAMES:
        _load_names()
    return _RCODE_NAMES.get(rcode, "other")


def parse_query(data: bytes) -> Query:
    """Parse a query's header, single question and optional OPT record (RFC 1035, 6891)."""
    if len(data) < 12:
        raise Drop("shorter than a header")
    ident, flags, qd, an, ns, ar = struct.unpack_from("!6H", data)
    if flags & FLAG_QR:
        raise Drop("a response, not a query")
    if flags & OPCODE_MASK:
        raise FormatError("opcode not supported", NOTIMP)
    if qd != 1 or an or ns or ar > 1:
        raise FormatError(f"expected one question, got qd={qd} an={an} ns={ns} ar={ar}",
                          FORMERR)
    labels, pos = _read_name(data, 12)
    if pos + 4 > len(data):
        raise FormatError("question truncated", FORMERR)
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    q = Query(data, ident, flags, labels, pos + 4, qtype, qclass)
    if ar:
        _read_opt(data, pos + 4, q)
    elif pos + 4 != len(data):
        raise FormatError("trailing bytes after the question", FORMERR)
    return q


def _read_name(data: bytes, pos: int) -> tuple[tuple[bytes, ...], int]:
    labels: list[bytes] = []
    total = 0
    while True:
        if pos >= len(data):
            raise FormatError("name runs past the packet", FORMERR)
        length = data[pos]
        if length == 0:
            return tuple(labels), pos + 1
        if length > 63:
            raise FormatError("compressed or extended label in a question", FORMERR)
        total += length + 1
        if total > 254 or pos + 1 + length > len(data):
            raise FormatError("name too long or truncated", FORMERR)
        labels.append(data[pos + 1:pos + 1 + length])
        pos += 1 + length


def _read_opt(data: bytes, pos: int, q: Query) -> None:
    if pos + 11 > len(data) or data[pos] != 0:
        raise FormatError("additional record is not an OPT at the root", FORMERR)
    rtype, size, _ext, version, opt_flags, rdlen = struct.unpack_from("!HHBBHH", data, pos + 1)
    if rtype != T_OPT or pos + 11 + rdlen != len(data):
        raise FormatError("additional record is not a well-formed OPT", FORMERR)
    q.edns, q.has_options = True, rdlen > 0
    q.udp_size = min(max(size, 512), MAX_UDP)  # MAX_UDP: what an answer may amplify to
    q.do = bool(opt_flags & 0x8000)
    if version != 0:
        raise FormatError(f"EDNS version {version}", BADVERS)


# ---- answers ---------------------------------------------------------------------------------

def _opt(query: Query) -> list[EDNS0]:
    from dnslib import EDNS0

    return [EDNS0(udp_len=OUR_UDP_SIZE)] if query.edns else []


def pack_reply(query: Query, reply: Reply) -> bytes:
    """Pack a zone reply for ``query`` (dnslib: only on a cache miss)."""
    from dnslib import DNSHeader, DNSLabel, DNSQuestion, DNSRecord

    rd = query.flags & FLAG_RD
    header = DNSHeader(id=query.id, qr=1, aa=int(reply.authoritative), rd=int(bool(rd)), ra=1,
                       rcode=reply.rcode)
    record = DNSRecord(header, q=DNSQuestion(DNSLabel(query.labels), query.qtype, query.qclass),
                       rr=list(reply.answer), auth=list(reply.authority),
                       ar=list(reply.additional) + _opt(query))
    return bytes(record.pack())


ANY_TTL = 8482
_ANY_RDATA = b"\x0dANY obsoleted\x0cSee RFC 8482"


def any_minimal(query: Query) -> bytes:
    """RFC 8482 section 4.2: one synthesized HINFO record for an ANY question."""
    flags = FLAG_QR | FLAG_RA | (query.flags & (FLAG_RD | FLAG_CD))
    header = struct.pack("!6H", query.id, flags, 1, 1, 0, 1 if query.edns else 0)
    answer = struct.pack("!HHHIH", 0xC00C, 13, 1, ANY_TTL, len(_ANY_RDATA)) + _ANY_RDATA
    return header + query.question + answer + (_opt_bytes() if query.edns else b"")


def rcode_reply(query: Query, rcode: int) -> bytes:
    """Header and question with ``rcode`` (SERVFAIL, REFUSED, ...), and OPT if asked with one."""
    flags = FLAG_QR | FLAG_RA | (query.flags & (FLAG_RD | FLAG_CD)) | (rcode & 0xF)
    opt = _opt_bytes(rcode >> 4) if query.edns else b""
    header = struct.pack("!6H", query.id, flags, 1, 0, 0, 1 if query.edns else 0)
    return header + query.question + opt


def _opt_bytes(ext_rcode: int = 0) -> bytes:
    return b"\x00" + struct.pack("!HHBBHH", T_OPT, OUR_UDP_SIZE, ext_rcode, 0, 0, 0)


def error_reply(data: bytes, rcode: int) -> bytes | None:
    """A header-only answer to a query we could not parse (None if not even a header)."""
    if len(data) < 12:
        return None
    ident, flags = struct.unpack_from("!HH", data)
    if flags & FLAG_QR:
        return None
    out_flags = FLAG_QR | (flags & (OPCODE_MASK | FLAG_RD)) | (rcode & 0xF)
    if rcode > 15:  # BADVERS needs an OPT for its upper bits
        return struct.pack("!6H", ident, out_flags, 0, 0, 0, 1) + _opt_bytes(rcode >> 4)
    return struct.pack("!6H", ident, out_flags, 0, 0, 0, 0)


def truncated(packet: bytes, query: Query) -> bytes:
    """``packet`` cut to header + question (+ OPT) with TC set: the client retries over TCP."""
    flags = struct.unpack_from("!H", packet, 2)[0] | FLAG_TC
    header = struct.pack("!6H", query.id, flags, 1, 0, 0, 1 if query.edns else 0)
    return header + query.question + (_opt_bytes() if query.edns else b"")


def udp_limit(query: Query) -> int:
    return query.udp_size if query.edns else 512


def with_id(packet: bytes, ident: int) -> bytes:
    return struct.pack("!H", ident) + packet[2:]


# ---- reading answers (from upstreams) --------------------------------------------------------

@dataclass(frozen=True)
class RecordRef:
    section: int  # 0 answer, 1 authority, 2 additional
    rtype: int
    ttl_offset: int
    ttl: int
    rdata: bytes


def skip_name(data: bytes, pos: int) -> int:
    """The offset after a (possibly compressed) name starting at ``pos``."""
    for _ in range(128):
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2
        if length > 63:
            raise FormatError("bad label type", FORMERR)
        pos += 1 + length
    raise FormatError("name too long", FORMERR)


def records(data: bytes) -> Iterator[RecordRef]:
    """Every resource record of a response (raises FormatError on a malformed one)."""
    try:
        qd, an, ns, ar = struct.unpack_from("!4H", data, 4)
        pos = 12
        for _ in range(qd):
            pos = skip_name(data, pos) + 4
        for section, count in enumerate((an, ns, ar)):
            for _ in range(count):
                pos = skip_name(data, pos)
                rtype, _cls, ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
                start = pos + 10
                if start + rdlen > len(data):
                    raise FormatError("record runs past the packet", FORMERR)
                yield RecordRef(section, rtype, pos + 4, ttl, data[start:start + rdlen])
                pos = start + rdlen
    except (IndexError, struct.error) as e:
        raise FormatError(f"malformed response: {e}", FORMERR) from e


def make_query(name: str, qtype: int, qclass: int = 1, edns: bool = True) -> bytes:
    """A recursive query for ``name`` (ID 0; the forwarder sets its own)."""
    labels = [label.encode("latin-1") for label in name.strip(".").split(".") if label]
    qname = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    header = struct.pack("!6H", 0, FLAG_RD, 1, 0, 0, 1 if edns else 0)
    return header + qname + struct.pack("!HH", qtype, qclass) + (_opt_bytes() if edns else b"")
