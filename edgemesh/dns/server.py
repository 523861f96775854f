"""The DNS servers: one UDP loop and one TCP server on gevent, around an ``Answerer``.

The UDP loop reads datagrams from a raw non-blocking socket and answers a repeated question
inline from ``Answerer.exact`` (one dict lookup, one concatenation, one ``sendto``), without a
greenlet per packet. New questions are answered inline too when the zone or the cache knows
them; only questions for the upstream get a greenlet, from a bounded pool.

TCP (RFC 7766): length-prefixed messages, several per connection, an idle timeout, a bounded
pool of connections. Clients the ``ClientPolicy`` does not allow get no UDP answer and a REFUSED
TCP answer.
"""
from __future__ import annotations

import _socket
import logging
import socket
import struct
from typing import Any

import gevent
import gevent.pool
from gevent.server import StreamServer

from edgemesh.dns import mmsg, wire
from edgemesh.dns.answers import REQUESTS, UPSTREAM_HITS, ZONE_HITS, Answerer, Forward
from edgemesh.dns.clients import ClientPolicy
from edgemesh.dns.upstream import Forwarder
from edgemesh.runtime import metrics, tasks

log = logging.getLogger(__name__)

NOT_ALLOWED = metrics.counter("edgemesh_dns_not_allowed_total", "Queries from clients that "
                              "are not on this node, by transport (UDP dropped, TCP refused).",
                              ["transport"])
TCP_IDLE = 10.0
MAX_TCP_CONNECTIONS = 256
YIELD_EVERY = 64  # UDP packets handled before the loop lets other greenlets run
BATCH_YIELD_EVERY = 256  # the same for the batched loop
RCVBUF = 4 << 20
MAX_QUERY = 4096  # a longer UDP query is cut here and answered FORMERR


class DNSServer:
    """UDP and TCP listeners on one address; ``forwarder`` resolves what the zone does not."""

    def __init__(self, host: str, port: int, answerer: Answerer, forwarder: Forwarder,
                 policy: ClientPolicy, max_outstanding: int = 1000, batched: bool = True) -> None:
        self.host, self.port = host, port
        self.answerer = answerer
        self.forwarder = forwarder
        self.policy = policy
        self.batched = batched  # recvmmsg/sendmmsg where libc has them (False: one at a time)
        self.pool = gevent.pool.Pool(max_outstanding)
        self._udp: Any = None
        self._udp_loop: gevent.Greenlet | None = None
        self._tcp: StreamServer | None = None

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def start(self) -> None:
        """Bind UDP and TCP to the same port (port 0: any port free for both)."""
        for attempt in range(20 if self.port == 0 else 1):
            udp, port = self._bind_udp()
            listener = socket.socket(self.family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind((self.host, port))
                break
            except OSError:
                udp.close()
                listener.close()
                if attempt == 19 or self.port != 0:
                    raise
        self._udp, self.port = udp, port
        listener.listen(128)
        self._tcp = StreamServer(listener, self._tcp_connection,
                                 spawn=gevent.pool.Pool(MAX_TCP_CONNECTIONS))
        self._tcp.start()
        if self.batched and mmsg.available():
            batches = mmsg.Batches(self._udp.fileno(), self.family, MAX_QUERY)
            self._udp_loop = tasks.spawn("dns-udp", self._serve_udp_batched, batches)
        else:
            self._udp_loop = tasks.spawn("dns-udp", self._serve_udp)

    def _bind_udp(self) -> tuple[Any, int]:
        udp = _socket.socket(self.family, _socket.SOCK_DGRAM)
        udp.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        try:
            udp.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, RCVBUF)
        except OSError:
            pass
        try:
            udp.bind((self.host, self.port))
        except OSError:
            udp.close()
            raise
        udp.setblocking(False)
        return udp, udp.getsockname()[1]

    def stop(self) -> None:
        if self._udp_loop is not None:
            self._udp_loop.kill()
        if self._tcp is not None:
            self._tcp.stop(timeout=1)
        self.pool.kill()
        if self._udp is not None:
            self._udp.close()

    @property
    def listening(self) -> bool:
        return bool(self._udp_loop and not self._udp_loop.dead and self._tcp
                    and self._tcp.started)

    # ---- UDP ---------------------------------------------------------------------------------

    def _serve_udp(self) -> None:
        """The hot loop: a repeated question costs a dict lookup and two syscalls."""
        sock = self._udp
        recvfrom, sendto = sock.recvfrom, sock.sendto
        hub = gevent.get_hub()
        readable = hub.loop.io(sock.fileno(), 1)
        exact = self.answerer.exact  # cleared in place on store changes, never replaced
        known = self.policy.memo  # ip → allowed, filled by allowed(); cleared in place
        allowed = self.policy.allowed
        zone_hits = ZONE_HITS
        burst = range(YIELD_EVERY)
        while True:
            gevent.sleep(0)  # between bursts, let the other greenlets run
            for _ in burst:
                try:
                    data, addr = recvfrom(MAX_QUERY)
                except BlockingIOError:
                    hub.wait(readable)
                    continue
                except OSError:
                    continue  # e.g. ECONNREFUSED queued from an earlier send
                if not (known.get(addr[0]) or allowed(addr[0])):
                    NOT_ALLOWED.labels("udp").inc()
                    continue
                hit = exact.get(data[2:])
                if hit is None:
                    self._udp_miss(data, addr)
                    continue
                hit[1].value += 1
                zone_hits.value += 1
                try:
                    sendto(data[:2] + hit[0], addr)
                except OSError:
                    pass

    def _serve_udp_batched(self, batches: mmsg.Batches) -> None:
        """The hot loop with ``recvmmsg``/``sendmmsg``: two system calls per batch of queries.

        Repeated questions (the zone's and fresh upstream answers) are answered from the
        ``exact`` maps into the send slots; anything else takes ``_udp_miss`` as in
        ``_serve_udp``.
        """
        hub = gevent.get_hub()
        readable = hub.loop.io(self._udp.fileno(), 1)
        exact = self.answerer.exact  # all three cleared in place, never replaced
        upstream = self.answerer.upstream_exact
        folded = self.answerer.folded  # the same lookup as Answerer.folded_answer
        clock = self.answerer.clock
        known = self.policy.raw_memo  # raw sender address → allowed; cleared in place
        allowed_raw = self.policy.allowed_raw
        zone_hits, upstream_hits, not_allowed = ZONE_HITS, UPSTREAM_HITS, NOT_ALLOWED.labels("udp")
        receive, lengths, reply_to, send = (batches.receive, batches.lengths, batches.reply_to,
                                            batches.send)
        client_key, address = batches.client_key, batches.address
        data, size, iov_len = batches.data, batches.size, batches.iov_len
        ipv4 = batches.ipv4 if batches.v4 else None
        handled = 0
        while True:
            try:
                n = receive()
            except OSError:
                gevent.sleep(0)  # e.g. ECONNREFUSED queued from an earlier send
                continue
            if n == 0:
                handled = 0
                hub.wait(readable)
                continue
            k = zone = up = 0
            now = 0.0
            at, ki = -size, -6
            for j, length in enumerate(lengths(n)):
                at += size
                ki += 7
                key = ipv4[ki] if ipv4 is not None else client_key(j)
                ok = known.get(key)
                if ok is None:
                    ok = allowed_raw(key, address(j)[0])
                if not ok:
                    not_allowed.inc()
                    continue
                question = data[at + 2:at + length].tobytes()
                hit: Any = exact.get(question)
                if hit is not None:
                    zone += 1
                    hit[1].value += 1
                    tail = hit[0]
                else:
                    hit = upstream.get(question)
                    if hit is not None and not now:
                        now = clock()
                    if hit is None or now >= hit[1]:
                        hit = folded.get(question.lower())  # the zone's, in another case
                        if hit is None:
                            self._udp_miss(data[at:at + length].tobytes(), address(j))
                            continue
                        zone += 1
                        hit[1].value += 1
                        end = hit[2]
                        tail = hit[0][:10] + question[10:end] + hit[0][end:]
                    else:
                        up += 1
                        hit[2].value += 1
                        tail = hit[0]
                end = at + 2 + len(tail)
                if end - at > size:  # never past the slot (answers fit the UDP limit anyway)
                    self._send(data[at:at + 2].tobytes() + tail, address(j))
                    continue
                data[at + 2:end] = tail  # the answer over its question, after the ID
                if k == j:
                    iov_len[k + k + 1] = end - at
                else:
                    reply_to(k, j, end - at)
                k += 1
            zone_hits.value += zone
            upstream_hits.value += up
            if k:
                send(k)
            handled += n
            if handled >= BATCH_YIELD_EVERY:
                handled = 0
                gevent.sleep(0)  # let the other greenlets run

    def _udp_miss(self, data: bytes, addr: Any) -> None:
        out = self.answerer.cached(data) or self.answerer.answer(data, udp=True)
        if isinstance(out, Forward):
            if self.pool.full():
                out = self.answerer.forwarded(out, None)
            else:
                self.pool.spawn(self._forward_udp, out, addr)
                return
        if out is not None:
            self._send(out, addr)

    def _forward_udp(self, fwd: Forward, addr: Any) -> None:
        self._send(self.resolve(fwd), addr)

    def _send(self, packet: bytes, addr: Any) -> None:
        try:
            self._udp.sendto(packet, addr)
        except OSError:
            pass

    def resolve(self, fwd: Forward) -> bytes:
        """Ask the upstream for ``fwd`` and build the client's answer."""
        if fwd.cname is not None:
            data = wire.make_query(fwd.target, fwd.query.qtype, fwd.query.qclass)
        else:
            data = fwd.query.data
        return self.answerer.forwarded(fwd, self.forwarder.ask(data, fwd.key))

    # ---- TCP ---------------------------------------------------------------------------------

    def _tcp_connection(self, sock: socket.socket, addr: Any) -> None:
        try:
            sock.settimeout(TCP_IDLE)
            permitted = self.policy.allowed(addr[0])
            while True:
                head = _read(sock, 2)
                if head is None:
                    return
                data = _read(sock, struct.unpack("!H", head)[0])
                if data is None:
                    return
                out = self._tcp_answer(data) if permitted else _refused(data)
                if out is None:
                    return
                sock.sendall(struct.pack("!H", len(out)) + out)
                if not permitted:
                    return
        except (TimeoutError, OSError):
            return
        finally:
            sock.close()

    def _tcp_answer(self, data: bytes) -> bytes | None:
        out = self.answerer.answer(data, udp=False)
        if isinstance(out, Forward):
            return self.resolve(out)
        return out


def _refused(data: bytes) -> bytes | None:
    NOT_ALLOWED.labels("tcp").inc()
    try:
        query = wire.parse_query(data)
    except wire.Drop:
        return None
    except wire.FormatError:
        return wire.error_reply(data, wire.REFUSED)
    out = wire.rcode_reply(query, wire.REFUSED)
    REQUESTS.labels(query.type_name, "REFUSED").inc()
    return out


def _read(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
