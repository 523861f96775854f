"""The cache of upstream answers, sans-IO: packed answers with TTLs that count down.

What is cached and for how long (RFC 2181 §8, RFC 2308):

- NOERROR with answers: the smallest TTL of the answer and authority records;
- NXDOMAIN, and NOERROR without answers (NODATA): min(SOA TTL, SOA MINIMUM) of the SOA in the
  authority section; without a SOA the negative answer is not cached (RFC 2308 §5);
- anything else (SERVFAIL, REFUSED, truncated answers) is not cached.

TTLs are capped (a day for positive, three hours for negative answers, RFC 2308 §5). Expired
answers are kept a while longer and served, with TTL 30, only when every upstream fails
(serve-stale, RFC 8767): an edge node cut off from its upstream keeps resolving what it knew.

Entries are keyed by ``Query.cache_key`` (lower-cased name, type, class, DO bit); the packed
answer is stored with ID 0 and rendered for a client by patching the ID, the flags and the
question's spelling, and lowering each TTL by the entry's age.
"""
from __future__ import annotations

import struct
from collections.abc import Hashable
from dataclasses import dataclass, field

from edgemesh.dns import wire

MAX_POSITIVE_TTL = 86400
MAX_NEGATIVE_TTL = 10800
STALE_TTL = 30
T_SOA = 6


@dataclass
class CachedAnswer:
    packet: bytes  # the upstream's answer with ID 0
    ttls: tuple[tuple[int, int], ...]  # (offset of a TTL field, its value when stored)
    stored: float
    expires: float
    _age: int = -1
    _rendered: bytes = field(default=b"", repr=False)

    def fresh(self, now: float) -> bool:
        return now < self.expires

    def render(self, now: float, stale: bool = False) -> bytes:
        """The packet with every TTL lowered by the whole seconds since it was stored."""
        age = -2 if stale else int(now - self.stored)
        if age == self._age:
            return self._rendered
        buf = bytearray(self.packet)
        for offset, ttl in self.ttls:
            struct.pack_into("!I", buf, offset, STALE_TTL if stale else max(0, ttl - age))
        self._age, self._rendered = age, bytes(buf)
        return self._rendered

    def valid_until(self, now: float) -> float:
        """When ``render`` output changes next (the next whole second of age, or expiry)."""
        return min(self.expires, self.stored + int(now - self.stored) + 1)


def cache_ttl(packet: bytes) -> int:
    """How long an upstream answer may be cached (0: not at all)."""
    flags = struct.unpack_from("!H", packet, 2)[0]
    rcode = flags & 0xF
    if flags & wire.FLAG_TC or rcode not in (wire.NOERROR, wire.NXDOMAIN):
        return 0
    refs = [r for r in wire.records(packet) if r.rtype != wire.T_OPT]
    answers = [r for r in refs if r.section == 0]
    if rcode == wire.NOERROR and answers:
        return min(MAX_POSITIVE_TTL, *(r.ttl for r in refs if r.section < 2))
    soa = next((r for r in refs if r.section == 1 and r.rtype == T_SOA and len(r.rdata) >= 20),
               None)
    if soa is None:
        return 0
    minimum: int = struct.unpack("!I", soa.rdata[-4:])[0]
    return min(MAX_NEGATIVE_TTL, int(soa.ttl), minimum)


class AnswerCache:
    """A bounded map of upstream answers; the oldest entry goes first when it is full."""

    def __init__(self, size: int, stale_for: float = 86400.0, max_ttl: int = 0) -> None:
        self.size = size
        self.stale_for = stale_for
        self.max_ttl = max_ttl  # 0: each answer's own TTL (cacheDNS.cacheTTL)
        self._entries: dict[Hashable, CachedAnswer] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: Hashable, packet: bytes, now: float) -> CachedAnswer | None:
        """Store an upstream answer (any ID); None if it must not be cached."""
        try:
            ttl = cache_ttl(packet)
            if self.max_ttl:
                ttl = min(ttl, self.max_ttl)
            ttls = tuple((r.ttl_offset, r.ttl) for r in wire.records(packet)
                         if r.rtype != wire.T_OPT)
        except wire.FormatError:
            return None
        if ttl <= 0:
            return None
        entry = CachedAnswer(wire.with_id(packet, 0), ttls, now, now + ttl)
        self._entries.pop(key, None)
        while len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = entry
        return entry

    def get(self, key: Hashable, now: float) -> CachedAnswer | None:
        """The entry for ``key``, fresh or stale; entries stale for too long are dropped."""
        entry = self._entries.get(key)
        if entry is not None and now >= entry.expires + self.stale_for:
            del self._entries[key]
            return None
        return entry

    def clear(self) -> None:
        self._entries.clear()
