"""From query bytes to answer bytes, sans-IO: the zone, the caches, and what needs an upstream.

``Answerer.answer(data)`` returns the answer's bytes, ``None`` (drop), or a ``Forward`` that the
I/O shell resolves through the upstream before calling ``Answerer.forwarded``.

Speed: a repeated UDP question is served from ``exact``, a dict from the query's bytes after
the ID to the answer's bytes after the ID. The servers look it up themselves before calling
into this class, so the common case costs one dict lookup and one concatenation. Entries of
``exact`` derived from the store are dropped when it changes (``invalidate``); entries from the
upstream cache carry the time their TTLs change and live in ``upstream_exact``.

Names compare without case (RFC 4343), and clients that randomise the case of their questions
(the "0x20" defence against spoofing) would miss ``exact`` on every query: ``folded`` holds the
same zone answers under the query in lower case (``_fold`` says when that is safe), and
``folded_answer`` serves them with the client's spelling of the question put back (the answer's
names point at it).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgemesh.dns import wire
from edgemesh.dns.cache import AnswerCache, CachedAnswer
from edgemesh.dns.zone import Reply, ZoneData, resolve
from edgemesh.runtime import metrics
from edgemesh.runtime.logs import Once

log = logging.getLogger(__name__)

REQUESTS = metrics.counter("edgemesh_dns_requests_total", "DNS queries answered, by query type "
                           "and response code.", ["type", "rcode"])
MALFORMED = metrics.counter("edgemesh_dns_malformed_total", "Malformed DNS packets, by what "
                            "was done with them.", ["action"])
CACHE_HITS = metrics.counter("edgemesh_dns_cache_hits_total", "Answers served from a cache.",
                             ["cache"])
CACHE_MISSES = metrics.counter("edgemesh_dns_cache_misses_total", "Questions no cache could "
                               "answer.", ["cache"])
ANY_MINIMAL = metrics.counter("edgemesh_dns_any_minimal_total", "ANY queries for names outside "
                             "the zone answered with one HINFO record (RFC 8482), not "
                             "forwarded.")
ZONE_HITS = CACHE_HITS.labels("zone")
UPSTREAM_HITS = CACHE_HITS.labels("upstream")
_once = Once()

T_AXFR, T_IXFR, T_ANY, CLASS_IN, CLASS_ANY = 252, 251, 255, 1, 255


@dataclass
class Forward:
    """A question for the upstream (``cname``: an ExternalName answer waiting for its target)."""
    query: wire.Query
    udp: bool
    stale: CachedAnswer | None = None
    cname: Reply | None = None
    target: str = ""

    @property
    def key(self) -> tuple[bytes, int, int, bool]:
        q = self.query
        if self.cname is not None:
            return (self.target.encode(), q.qtype, q.qclass, q.do)
        return q.cache_key


class Answerer:
    """Answers queries from the zone and the caches; see the module docstring."""

    def __init__(self, zone_data: Callable[[], ZoneData], cache: AnswerCache | None,
                 exact_size: int = 10000, clock: Callable[[], float] | None = None) -> None:
        self._zone_data = zone_data
        self._zone: ZoneData | None = None
        self.cache = cache
        self.exact_size = exact_size
        self.exact: dict[bytes, tuple[bytes, metrics.Counter]] = {}
        self.folded: dict[bytes, tuple[bytes, metrics.Counter, int]] = {}
        self.upstream_exact: dict[bytes, tuple[bytes, float, metrics.Counter]] = {}
        self.clock = clock or time.monotonic

    def invalidate(self, *_: object) -> None:
        """The store changed: forget the zone and every answer derived from it."""
        self._zone = None
        self.exact.clear()
        self.folded.clear()

    @property
    def zone(self) -> ZoneData:
        if self._zone is None:
            self._zone = self._zone_data()
        return self._zone

    # ---- the slow path -----------------------------------------------------------------------

    def answer(self, data: bytes, udp: bool = True) -> bytes | Forward | None:
        """The answer to one query packet, or what to ask the upstream."""
        try:
            query = wire.parse_query(data)
        except wire.Drop:
            MALFORMED.labels("dropped").inc()
            return None
        except wire.FormatError as e:
            MALFORMED.labels("formerr").inc()
            if _once(str(e)):
                log.info("malformed DNS query (%s); answering %s", e, wire.rcode_name(e.hint or 1))
            return wire.error_reply(data, e.hint or wire.FORMERR)
        if query.qtype in (T_AXFR, T_IXFR):
            return self._finish(query, wire.rcode_reply(query, wire.REFUSED), udp, cache=True)
        reply = None
        if query.qclass in (CLASS_IN, CLASS_ANY):
            reply = resolve(self.zone, query.name_text, query.qtype)
        if reply is not None:
            if reply.chase:
                return Forward(query, udp, cname=reply, target=reply.chase)
            CACHE_MISSES.labels("zone").inc()
            return self._finish(query, wire.pack_reply(query, reply), udp, cache=True)
        if query.qtype == T_ANY:  # RFC 8482 (CoreDNS's "any"): not forwarded, one small HINFO
            ANY_MINIMAL.inc()
            return self._finish(query, wire.any_minimal(query), udp, cache=True)
        return self._from_cache(query, udp)

    def _from_cache(self, query: wire.Query, udp: bool) -> bytes | Forward:
        now = self.clock()
        entry = self.cache.get(query.cache_key, now) if self.cache is not None else None
        if entry is None or not entry.fresh(now):
            CACHE_MISSES.labels("upstream").inc()
            return Forward(query, udp, stale=entry)
        UPSTREAM_HITS.inc()
        packet = self._for_client(entry.render(now), query)
        out = self._finish(query, packet, udp, cache=False)
        if udp and not query.has_options:
            while len(self.upstream_exact) >= self.exact_size:
                del self.upstream_exact[next(iter(self.upstream_exact))]
            self.upstream_exact[query.data[2:]] = (out[2:], entry.valid_until(now),
                                                   REQUESTS.labels(query.type_name,
                                                                   wire.rcode_name(out[3] & 0xF)))
        return out

    def forwarded(self, fwd: Forward, response: bytes | None) -> bytes:
        """The client's answer once the upstream answered (``response``) or failed (None)."""
        query = fwd.query
        now = self.clock()
        if response is not None and self.cache is not None:
            self.cache.put(fwd.key, response, now)
        if fwd.cname is not None:
            return self._finish(query, self._chased(query, fwd.cname, response), fwd.udp, False)
        if response is None:
            if fwd.stale is not None:
                CACHE_HITS.labels("stale").inc()
                return self._finish(query, self._for_client(fwd.stale.render(now, stale=True),
                                                            query), fwd.udp, cache=False)
            return self._finish(query, wire.rcode_reply(query, wire.SERVFAIL), fwd.udp, False)
        return self._finish(query, self._for_client(response, query), fwd.udp, cache=False)

    def _chased(self, query: wire.Query, cname: Reply, response: bytes | None) -> bytes:
        """The ExternalName's CNAME followed by the upstream's answer for its target (D5.2)."""
        if response is None:
            return wire.rcode_reply(query, wire.SERVFAIL)
        from dnslib import RR, DNSError, DNSRecord  # on use: an idle agent never loads dnslib

        try:
            upstream = DNSRecord.parse(response)
        except (DNSError, ValueError, IndexError) as e:
            log.debug("unparsable upstream answer for %s: %s", cname.chase, e)
            return wire.rcode_reply(query, wire.SERVFAIL)
        merged = Reply(rcode=upstream.header.rcode, answer=list(cname.answer) + list(upstream.rr),
                       authority=[r for r in upstream.auth if isinstance(r, RR)],
                       authoritative=False)
        packet = wire.pack_reply(query, merged)
        if upstream.header.tc:
            packet = packet[:2] + bytes([packet[2] | 0x02]) + packet[3:]
        return packet

    @staticmethod
    def _for_client(packet: bytes, query: wire.Query) -> bytes:
        """An upstream answer with the client's ID, RD/CD flags and spelling of the question."""
        keep = wire.FLAG_RD | wire.FLAG_CD
        flags = (int.from_bytes(packet[2:4], "big") & ~keep) | (query.flags & keep)
        end = 12 + len(query.question)
        return (query.id.to_bytes(2, "big") + flags.to_bytes(2, "big") + packet[4:12]
                + query.question + packet[end:])

    def _finish(self, query: wire.Query, packet: bytes, udp: bool, cache: bool) -> bytes:
        """Fit the answer to the client's UDP size, count it, remember it for ``exact``."""
        if udp and len(packet) > wire.udp_limit(query):
            packet = wire.truncated(packet, query)
        counter = REQUESTS.labels(query.type_name, wire.rcode_name(packet[3] & 0xF))
        counter.inc()
        if cache and udp and not query.has_options:
            exact = self.exact
            while len(exact) >= self.exact_size:
                del exact[next(iter(exact))]
            exact[query.data[2:]] = (packet[2:], counter)
            self._fold(query, packet, counter)
        return packet

    def _fold(self, query: wire.Query, packet: bytes, counter: metrics.Counter) -> None:
        """Remember the answer in ``folded`` under the query in lower case, when that key can
        only match the same question in another case: no ASCII letter outside the name (the
        header, type, class and anything after: lowering changes nothing there, and a query
        whose lowered bytes equal the key has the same bytes there), and the answer repeats the
        question as asked. Label lengths are below 64: lowering never changes them."""
        question = query.data[2:]
        end = 10 + len(query.question)  # the question's end, after the ID
        outside = question[:10] + question[end - 4:]
        if outside.lower() != outside.upper() or packet[12:end + 2] != question[10:end]:
            return
        folded = self.folded
        while len(folded) >= self.exact_size:
            del folded[next(iter(folded))]
        folded[question.lower()] = (packet[2:], counter, end)

    # ---- the fast path (the servers inline the same lookups) ---------------------------------

    def cached(self, data: bytes) -> bytes | None:
        """The answer to a repeated UDP question from ``exact`` or ``folded``, or None."""
        hit = self.exact.get(data[2:])
        if hit is not None:
            hit[1].value += 1
            ZONE_HITS.value += 1
            return data[:2] + hit[0]
        tail = self.folded_answer(data[2:])
        if tail is not None:
            return data[:2] + tail
        up = self.upstream_exact.get(data[2:])
        if up is not None:
            if self.clock() < up[1]:
                up[2].value += 1
                UPSTREAM_HITS.value += 1
                return data[:2] + up[0]
            del self.upstream_exact[data[2:]]
        return None

    def folded_answer(self, question: bytes) -> bytes | None:
        """The answer after the ID to ``question`` (the query after its ID) from ``folded``,
        with the question as the client spelled it; counted. None if not there."""
        hit = self.folded.get(question.lower())
        if hit is None:
            return None
        tail, counter, end = hit  # its question differs from this one only in letters' case
        counter.value += 1
        ZONE_HITS.value += 1
        return tail[:10] + question[10:end] + tail[end:]
