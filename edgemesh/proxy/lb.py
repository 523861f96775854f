"""Load balancing, sans-IO: which endpoint gets the next connection, datagram session or request.

One ``Balancer`` serves one service port, whatever carries the traffic (TCP, UDP, HTTP). It is
given the current endpoints on every call, so it never holds a stale list, and a request key:
the client IP for ``sessionAffinity: ClientIP`` and ``consistentHash.useSourceIp``, or (from the
HTTP layer) a header or cookie value.

    balancer = Balancer(LBSpec(Policy.ROUND_ROBIN), node_name="edge-1")
    backend = balancer.pick(backends, key="10.0.0.7", exclude=set())
    ...                                    # connection done
    balancer.release(backend)              # LEAST_REQUEST counts what is in flight

Policies:
- ROUND_ROBIN: endpoints in a stable order (sorted), one after another.
- RANDOM: uniform choice.
- LEAST_REQUEST: two random choices, the one with fewer requests in flight wins (P2C).
- CONSISTENT_HASH: a ring of ``partition_count`` partitions, owners chosen with
  ``replication_factor`` virtual nodes per endpoint and a bounded load: no endpoint owns more
  than ``ceil(load * partitions / endpoints)`` partitions (the scheme of buraksezer/consistent,
  which the Go EdgeMesh uses, with blake2b instead of xxhash). A key always maps to the same
  endpoint while the endpoint set is unchanged; a change moves only the affected partitions.

``affinity_timeout`` (Kubernetes ``sessionAffinity: ClientIP``) overlays any policy: a key seen
within the timeout gets the endpoint it got before, while that endpoint still exists.
``prefer_local`` narrows the choice to endpoints on this node when there are any.
``exclude`` holds endpoints that just failed for this connection, so a retry moves on.
"""
from __future__ import annotations

import bisect
import enum
import hashlib
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from edgemesh.meta.store import Backend

Clock = Callable[[], float]


class Policy(enum.Enum):
    ROUND_ROBIN = "ROUND_ROBIN"
    RANDOM = "RANDOM"
    LEAST_REQUEST = "LEAST_REQUEST"
    CONSISTENT_HASH = "CONSISTENT_HASH"


class HashKey(enum.Enum):
    """What the request key of a CONSISTENT_HASH port is made of."""
    NONE = "none"
    SOURCE_IP = "sourceIp"
    HTTP_HEADER = "httpHeaderName"
    HTTP_COOKIE = "httpCookie"
    HTTP_QUERY = "httpQueryParameterName"


@dataclass(frozen=True)
class RingParams:
    partition_count: int = 100
    replication_factor: int = 10
    load: float = 1.25


@dataclass(frozen=True)
class LBSpec:
    """How one service port is balanced (built by ``policy.spec_for``)."""
    policy: Policy = Policy.ROUND_ROBIN
    hash_key: HashKey = HashKey.NONE
    hash_name: str = ""  # header, cookie or query parameter name for HTTP keys
    affinity_timeout: float = 0.0  # seconds; 0 = no ClientIP affinity
    ring: RingParams = RingParams()
    prefer_local: bool = False

    @property
    def wants_client_ip(self) -> bool:
        return self.affinity_timeout > 0 or self.hash_key is HashKey.SOURCE_IP


AFFINITY_LIMIT = 65536  # remembered client keys per service port
_RNG = random.Random()  # shared: a generator's state is 2.5 KB, and there is one per port


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Ring:
    """Partitions → owners with bounded load, for one endpoint set (immutable once built)."""

    def __init__(self, members: Sequence[Backend], params: RingParams) -> None:
        self.members = tuple(members)
        self.params = params
        self.owners: list[int] = self._distribute() if members else []

    def _distribute(self) -> list[int]:
        n, p = len(self.members), self.params.partition_count
        points = sorted((_hash64(f"{b.ip}:{b.port}#{r}"), i)
                        for i, b in enumerate(self.members)
                        for r in range(self.params.replication_factor))
        hashes = [h for h, _ in points]
        limit = math.ceil(self.params.load * p / n)
        loads = [0] * n
        owners = []
        for part in range(p):
            start = bisect.bisect_left(hashes, _hash64(f"partition#{part}")) % len(points)
            for step in range(len(points)):
                member = points[(start + step) % len(points)][1]
                if loads[member] < limit:
                    break
            loads[member] += 1
            owners.append(member)
        return owners

    def lookup(self, key: str, exclude: Collection[Backend] = ()) -> Backend | None:
        """The owner of ``key``'s partition; the next partitions' owners if it is excluded."""
        if not self.owners:
            return None
        p = len(self.owners)
        first = _hash64(key) % p
        for step in range(p):
            member = self.members[self.owners[(first + step) % p]]
            if member not in exclude:
                return member
        return None


class Balancer:
    """Chooses endpoints for one service port; see the module docstring."""

    def __init__(self, spec: LBSpec, node_name: str = "", *, clock: Clock = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.spec = spec
        self.node_name = node_name
        self._clock = clock
        self._rng = rng or _RNG
        self._next = 0
        self._active: dict[Backend, int] = {}
        self._affinity: OrderedDict[str, tuple[Backend, float]] = OrderedDict()
        self._ring: Ring | None = None
        self._counts = spec.policy is Policy.LEAST_REQUEST
        # plain round robin needs none of the general path: the hot case, kept cheap
        self._plain_rr = (spec.policy is Policy.ROUND_ROBIN and not spec.affinity_timeout
                          and not spec.prefer_local)
        self.wants_client_ip = spec.wants_client_ip

    def pick(self, backends: Sequence[Backend], key: str | None = None,
             exclude: Collection[Backend] = ()) -> Backend | None:
        """An endpoint for ``key``, never one in ``exclude``; None if none is left."""
        if self._plain_rr and not exclude:
            if not backends:
                return None
            chosen = backends[self._next % len(backends)]
            self._next += 1
            return chosen
        candidates = self._candidates(backends, exclude)
        if not candidates:
            return None
        sticky = self._sticky(key, candidates) if self.spec.affinity_timeout > 0 else None
        chosen = sticky or self._choose(backends, candidates, key, exclude)
        if self.spec.affinity_timeout > 0 and key is not None:
            self._remember(key, chosen)
        if self._counts:
            self._active[chosen] = self._active.get(chosen, 0) + 1
        return chosen

    def release(self, backend: Backend) -> None:
        """A request picked earlier has finished (LEAST_REQUEST counts what is in flight)."""
        if not self._counts:
            return
        n = self._active.get(backend, 0) - 1
        if n > 0:
            self._active[backend] = n
        else:
            self._active.pop(backend, None)

    def active(self, backend: Backend) -> int:
        return self._active.get(backend, 0)

    # ---- internals ----------------------------------------------------------------------------

    def _candidates(self, backends: Sequence[Backend],
                    exclude: Collection[Backend]) -> list[Backend]:
        pool = [b for b in backends if b not in exclude] if exclude else list(backends)
        if self.spec.prefer_local and self.node_name:
            local = [b for b in pool if b.node_name == self.node_name]
            if local:
                return local
        return pool

    def _choose(self, backends: Sequence[Backend], candidates: list[Backend], key: str | None,
                exclude: Collection[Backend]) -> Backend:
        policy = self.spec.policy
        if policy is Policy.CONSISTENT_HASH and key is not None:
            # The ring holds every endpoint, failed ones too, so a retry does not reshuffle keys.
            ring = self._ring_for(self._candidates(backends, ()))
            found = ring.lookup(key, exclude)
            if found is not None:
                return found
        if policy is Policy.RANDOM or len(candidates) == 1:
            return candidates[self._rng.randrange(len(candidates))]
        if policy is Policy.LEAST_REQUEST:
            a, b = self._rng.sample(candidates, 2)
            return a if self.active(a) <= self.active(b) else b
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen

    def _ring_for(self, candidates: list[Backend]) -> Ring:
        members = tuple(sorted(candidates, key=lambda b: (b.ip, b.port)))
        if self._ring is None or self._ring.members != members:
            self._ring = Ring(members, self.spec.ring)
        return self._ring

    def _sticky(self, key: str | None, candidates: list[Backend]) -> Backend | None:
        if key is None:
            return None
        entry = self._affinity.get(key)
        if entry is None:
            return None
        backend, expires = entry
        if expires < self._clock() or backend not in candidates:
            del self._affinity[key]
            return None
        return backend

    def _remember(self, key: str, backend: Backend) -> None:
        self._affinity[key] = (backend, self._clock() + self.spec.affinity_timeout)
        self._affinity.move_to_end(key)
        while len(self._affinity) > AFFINITY_LIMIT:
            self._affinity.popitem(last=False)
