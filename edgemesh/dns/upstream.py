"""The forwarder: asks upstream servers over UDP, retries over TCP when the answer is truncated.

- Every query goes out with a fresh random ID from a fresh socket (random source port), and
  only an answer with that ID to the same question is accepted (RFC 5452).
- One deadline (``upstreamTimeout``, default 1 s) covers every attempt of a query, so a client
  gets SERVFAIL (or a stale cached answer) within it when the upstreams are down.
- Identical questions in flight are sent once; at most ``maxOutstanding`` are in flight.
- The client's packet is forwarded as it came (EDNS0 and its options pass through).
"""
from __future__ import annotations

import errno
import logging
import random
import socket
import struct
import time
from collections.abc import Hashable

import gevent
import gevent.event

from edgemesh.config import split_host_port
from edgemesh.dns import wire
from edgemesh.runtime import metrics

log = logging.getLogger(__name__)

LATENCY = metrics.histogram("edgemesh_dns_upstream_duration_seconds", "Time upstream servers "
                            "took to answer, by transport.", ["transport"])
FAILURES = metrics.counter("edgemesh_dns_upstream_failures_total", "Upstream attempts that "
                           "failed, by reason.", ["reason"])
OVERLOAD = metrics.counter("edgemesh_dns_upstream_overload_total", "Queries not forwarded "
                           "because maxOutstanding were already in flight.")

Server = tuple[str, int]


def parse_servers(entries: list[str]) -> list[Server]:
    """``["1.1.1.1", "127.0.0.1:5353", "[::1]:53"]`` → (ip, port) pairs."""
    out = []
    for entry in entries:
        if entry.count(":") > 1 and not entry.startswith("["):
            out.append((entry, 53))  # a bare IPv6 address
        elif ":" in entry:
            out.append(split_host_port(entry))
        else:
            out.append((entry, 53))
    return out


def servers_from_resolv_conf(path: str = "/etc/resolv.conf",
                             exclude: set[Server] = frozenset()) -> list[Server]:  # type: ignore[assignment]
    """The host's nameservers, without our own listening address (no forwarding loops)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            server = (parts[1].split("%")[0], 53)
            if server not in exclude:
                found.append(server)
    return found


class Forwarder:
    """Asks the upstream servers; ``ask`` returns the answer (with the query's ID) or None."""

    def __init__(self, servers: list[Server], timeout: float = 1.0,
                 max_outstanding: int = 1000) -> None:
        self.servers = list(servers)
        self.timeout = timeout
        self.max_outstanding = max_outstanding
        self.outstanding = 0
        self._inflight: dict[Hashable, gevent.event.AsyncResult] = {}
        self._rng = random.SystemRandom()

    def ask(self, data: bytes, key: Hashable) -> bytes | None:
        """Forward the query ``data``; identical in-flight questions (``key``) share one ask."""
        ident = data[:2]
        pending = self._inflight.get(key)
        if pending is not None:
            try:
                shared = pending.get(timeout=self.timeout)
            except gevent.Timeout:
                return None
            return ident + shared[2:] if shared is not None else None
        if self.outstanding >= self.max_outstanding:
            OVERLOAD.inc()
            return None
        result = gevent.event.AsyncResult()
        self._inflight[key] = result
        self.outstanding += 1
        answer = None
        try:
            answer = self._ask(data)
        finally:
            self.outstanding -= 1
            del self._inflight[key]
            result.set(answer)
        return ident + answer[2:] if answer is not None else None

    def _ask(self, data: bytes) -> bytes | None:
        if not self.servers:
            FAILURES.labels("no_upstream").inc()
            return None
        deadline = time.monotonic() + self.timeout
        per_try = max(0.2, self.timeout / (len(self.servers) + 1))
        refused: set[Server] = set()
        attempt = 0
        while len(refused) < len(self.servers):
            server = self.servers[attempt % len(self.servers)]
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                FAILURES.labels("timeout").inc()
                return None
            if server in refused:
                continue
            try:
                answer = self._udp(server, data, min(per_try, remaining), deadline)
            except ConnectionRefusedError:
                FAILURES.labels("refused").inc()
                refused.add(server)
                continue
            except TimeoutError:
                FAILURES.labels("timeout").inc()
                continue
            except OSError as e:
                FAILURES.labels("error").inc()
                log.debug("upstream %s:%d: %s", *server, e)
                refused.add(server)
                continue
            if answer is not None:
                self._prefer(server)
                return answer
        return None

    def _prefer(self, server: Server) -> None:
        if self.servers[0] != server:
            self.servers.remove(server)
            self.servers.insert(0, server)

    def _udp(self, server: Server, data: bytes, wait: float, deadline: float) -> bytes | None:
        ident = self._rng.getrandbits(16)
        packet = struct.pack("!H", ident) + data[2:]
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        started = time.monotonic()
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(wait)
            sock.connect(server)
            sock.send(packet)
            while True:
                answer = sock.recv(65535)
                if _answers(answer, packet):
                    break
                FAILURES.labels("mismatch").inc()  # a late or spoofed answer: keep waiting
        LATENCY.labels("udp").observe(time.monotonic() - started)
        if answer[2] & 0x02:  # TC: ask again over TCP for the whole answer
            try:
                return self._tcp(server, packet, deadline)
            except (OSError, wire.FormatError) as e:
                FAILURES.labels("tcp").inc()
                log.debug("upstream %s:%d over TCP: %s", *server, e)
                return None
        return answer

    def _tcp(self, server: Server, packet: bytes, deadline: float) -> bytes | None:
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        started = time.monotonic()
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            sock.connect(server)
            sock.sendall(struct.pack("!H", len(packet)) + packet)
            length = struct.unpack("!H", _read_exactly(sock, 2))[0]
            answer = _read_exactly(sock, length)
        if not _answers(answer, packet):
            raise wire.FormatError("TCP answer does not match the question", wire.FORMERR)
        LATENCY.labels("tcp").observe(time.monotonic() - started)
        return answer


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise OSError(errno.ECONNRESET, "upstream closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _answers(answer: bytes, packet: bytes) -> bool:
    """``answer`` is a response to ``packet``: same ID, QR set, same question."""
    if len(answer) < 12 or answer[:2] != packet[:2] or not answer[2] & 0x80:
        return False
    try:
        qend = wire.skip_name(packet, 12) + 4
    except (wire.FormatError, IndexError):
        return False
    return answer[4:6] == packet[4:6] and answer[12:qend].lower() == packet[12:qend].lower()
