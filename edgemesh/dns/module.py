"""The agent's ``modules.edgeDNS``: node-local DNS for the cluster zone, forwarding the rest.

Listens on ``listenAddress:listenPort`` (empty address: ``commonConfig.bridgeDeviceIP`` on the
``edgemesh0`` bridge, created here). Upstreams: ``cacheDNS.upstreamServers``, else the host's
resolv.conf without our own address. Admin: check ``dns``, view ``/debug/dns``.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import gevent

from edgemesh import netdev, netlink
from edgemesh.dns.answers import Answerer
from edgemesh.dns.cache import AnswerCache
from edgemesh.dns.clients import ClientPolicy
from edgemesh.dns.records import ZoneIndex
from edgemesh.dns.server import DNSServer
from edgemesh.dns.upstream import Forwarder, parse_servers, servers_from_resolv_conf
from edgemesh.dns.zone import ZoneData
from edgemesh.runtime import tasks

if TYPE_CHECKING:
    from edgemesh.context import Context

log = logging.getLogger(__name__)

ZONE_KINDS = ("Service", "EndpointSlice", "Endpoints", "Namespace")
LOCAL_REFRESH = 30.0


class DNSModule:
    """Owns the servers, the answerer and its caches; rebuilds zone data on store changes."""
    name = "edgeDNS"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.cfg = ctx.config.modules.edgeDNS
        self.host = self.cfg.listenAddress or ctx.config.commonConfig.bridgeDeviceIP
        self.serial = int(time.time())
        cache_cfg = self.cfg.cacheDNS
        cache = AnswerCache(cache_cfg.cacheSize, max_ttl=cache_cfg.cacheTTL) \
            if cache_cfg.enable else None
        ns_ips = () if self.host in ("0.0.0.0", "::") else (self.host,)
        self.index = ZoneIndex(self.cfg.zone, self.cfg.ttl, ns_ips)
        # the Edge CNI's virtual addresses (filled by the proxy's sync): a change drops the
        # cached answers, the records stay
        self.index.data.addresses = ctx.mesh_addresses
        self.answerer = Answerer(self._zone_data, cache, exact_size=cache_cfg.cacheSize)
        self.policy = ClientPolicy(self.cfg.allowedClients)
        self.forwarder = Forwarder(self._upstreams(), cache_cfg.upstreamTimeout,
                                   cache_cfg.maxOutstanding)
        self.server = DNSServer(self.host, self.cfg.listenPort, self.answerer, self.forwarder,
                                self.policy, cache_cfg.maxOutstanding)
        self._refresher: gevent.Greenlet | None = None
        self._zone_refresher = tasks.Reconciler("dns-zone", self._refresh_zone)
        ctx.admin.add_check("dns", self._check)  # not ready until start() has run

    def _upstreams(self) -> list[tuple[str, int]]:
        configured = self.cfg.cacheDNS.upstreamServers
        own = {(self.host, self.cfg.listenPort),
               (self.ctx.config.commonConfig.bridgeDeviceIP, 53)}
        servers = parse_servers(configured) if configured else servers_from_resolv_conf()
        return [s for s in servers if s not in own]  # never forward to ourselves

    def _zone_data(self) -> ZoneData:
        """The zone, brought up to the store's revision (only changed Services rebuilt)."""
        return self.index.refresh(self.ctx.store, self.serial)

    def _store_changed(self, _kinds: frozenset[str]) -> None:
        self.serial = max(self.serial + 1, int(time.time()))
        self.answerer.invalidate()
        self._zone_refresher.wake()

    def _addresses_changed(self) -> None:
        self.serial = max(self.serial + 1, int(time.time()))
        self.answerer.invalidate()

    def _refresh_zone(self) -> None:
        """Bring the zone up to the store now, so no query waits for the rebuild."""
        _ = self.answerer.zone

    def start(self) -> None:
        if self.host == self.ctx.config.commonConfig.bridgeDeviceIP:
            netdev.ensure(self.ctx.config)
        self.policy.set_local(netdev.local_addresses())
        self.ctx.store.subscribe(self._store_changed, ZONE_KINDS)
        if self.index.data.addresses is not None:
            self.index.data.addresses.listeners.append(self._addresses_changed)
        self._refresh_zone()  # built before the servers answer (and before /readyz says so)
        self._zone_refresher.start()
        self.server.start()
        self._refresher = tasks.spawn_forever("dns-local-addresses", self._refresh_local,
                                              backoff=0)
        self.ctx.admin.add_view("dns", self.view)
        log.info("DNS on %s:%d (zone %s), upstreams %s", self.host, self.server.port,
                 self.cfg.zone, ", ".join(f"{h}:{p}" for h, p in self.forwarder.servers)
                 or "none")

    def _refresh_local(self) -> None:
        """Re-read this node's addresses when the kernel says they changed (netlink), or every
        ``LOCAL_REFRESH`` seconds where address events cannot be had."""
        try:
            events = netlink.AddressEvents()
        except OSError as e:
            log.debug("no netlink address events (%s); re-reading every %.0fs", e,
                      LOCAL_REFRESH)
            gevent.sleep(LOCAL_REFRESH)
            self.policy.set_local(netdev.local_addresses())
            return
        try:
            self.policy.set_local(netdev.local_addresses())  # what changed before we joined
            while True:
                events.wait()
                self.policy.set_local(netdev.local_addresses())
        finally:
            events.close()

    def stop(self) -> None:
        self.ctx.store.unsubscribe(self._store_changed)
        self._zone_refresher.stop()
        if self._refresher is not None:
            self._refresher.kill()
        self.server.stop()

    def _check(self) -> str:
        return "" if self.server.listening else "DNS servers not running"

    def view(self) -> dict[str, Any]:
        """``/debug/dns``: where we listen, what we know, cache sizes and upstreams."""
        zone = self.answerer.zone
        cache = self.answerer.cache
        return {"listen": f"{self.host}:{self.server.port}", "zone": zone.zone,
                "ttl": zone.ttl, "serial": zone.serial, "synced": zone.synced,
                "stale": self.ctx.store.stale_reason,
                "services": len(zone.services), "namespaces": sorted(zone.namespaces),
                "cachedAnswers": len(self.answerer.exact),
                "upstreamCache": len(cache) if cache is not None else None,
                "upstreams": [f"{h}:{p}" for h, p in self.forwarder.servers],
                "outstanding": self.forwarder.outstanding,
                "allowedClients": list(self.cfg.allowedClients)}


def build(ctx: Context) -> DNSModule:
    """The module factory named in ``edgemesh.agent.MODULES``."""
    return DNSModule(ctx)
