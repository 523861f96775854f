"""The Go EdgeMesh's config keys (kubeedge/edgemesh v1.12-v1.17) and what each one becomes here.

The Go EdgeMesh reads its YAML leniently (sigs.k8s.io/yaml: unknown keys ignored, field names
matched in any case, so v1.12's printed ``Mode``, ``NodeName``, ``Caller`` load). ``translate``
rewrites a parsed document before the schema in ``edgemesh.config`` sees it:

- a key of ours spelled in another case: read under its canonical spelling, with a warning;
- a Go key we do not implement: dropped, with one warning naming it and what replaces it;
- a Go feature switched on that we do not have (``socks5Proxy.enable: true``): a problem (exit 2);
- a Go key with another name here: moved to ours (``tunnelPeerBaseStreamIn``).

Everything else passes through untouched, so a key nobody ever had is still reported by the
schema as unknown. ``GO_KEYS`` is the one list of Go keys; docs/configuration.md prints it.
"""
from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass
from typing import Any


class Fate(enum.Enum):
    SAME = "honoured"                      # our key of the same path and meaning
    MAPPED = "honoured as"                 # our key of another name
    IGNORED = "ignored, with a warning"    # accepted; what replaces it is in the note
    REFUSED_IF_ENABLED = "refused when enabled"  # a section: enable: true exits 2, else ignored
    SECTION = "section"                    # a Go-only mapping whose keys have their own fates


@dataclass(frozen=True)
class GoKey:
    """One key path of the Go config (``[]`` marks list items) and its fate here."""
    path: str
    fate: Fate
    note: str = ""
    target: str = ""  # MAPPED: our key path

    @property
    def parent(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.path.rpartition(".")[2]


S, M, IGN, R, C = Fate.SAME, Fate.MAPPED, Fate.IGNORED, Fate.REFUSED_IF_ENABLED, Fate.SECTION
_SOURCE = ("chosen without it: kubeAPIConfig.kubeConfig or master, else in-cluster when "
           "KUBERNETES_SERVICE_HOST is set, else the metaServer")
_LB = [
    GoKey("loadBalancer", S),
    GoKey("loadBalancer.caller", IGN, "internal to the Go EdgeMesh"),
    GoKey("loadBalancer.nodeName", IGN, "internal: the node name is nodeName / $NODE_NAME"),
    GoKey("loadBalancer.consistentHash", S),
    GoKey("loadBalancer.consistentHash.partitionCount", S),
    GoKey("loadBalancer.consistentHash.replicationFactor", S),
    GoKey("loadBalancer.consistentHash.load", S),
]
_TUNNEL = "modules.edgeTunnel"
_PER_PEER = ("streams are limited per peer, on the receiving side only: "
             "modules.edgeTunnel.maxStreamsPerPeer")

GO_KEYS: tuple[GoKey, ...] = (
    GoKey("apiVersion", S), GoKey("kind", S),
    GoKey("pprofConfig", IGN, "Go profiling; runtime figures are at /debug/runtime and /metrics "
                              "on commonConfig.adminAddress"),
    GoKey("kubeAPIConfig", S), GoKey("kubeAPIConfig.master", S),
    GoKey("kubeAPIConfig.kubeConfig", S),
    GoKey("kubeAPIConfig.contentType", IGN, "list+watch always asks for JSON"),
    GoKey("kubeAPIConfig.qps", IGN, "one list+watch per kind, no client-side rate limit"),
    GoKey("kubeAPIConfig.burst", IGN, "one list+watch per kind, no client-side rate limit"),
    GoKey("kubeAPIConfig.mode", IGN, "the metadata source is " + _SOURCE),
    GoKey("kubeAPIConfig.deleteKubeConfig", IGN, "the kubeconfig file is never deleted; mount it "
                                                 "read-only"),
    GoKey("kubeAPIConfig.metaServer", S), GoKey("kubeAPIConfig.metaServer.server", S),
    GoKey("kubeAPIConfig.metaServer.security", S),
    *(GoKey(f"kubeAPIConfig.metaServer.security.{k}", S)
      for k in ("requireAuthorization", "insecureSkipTLSVerify", "tlsCaFile", "tlsCertFile",
                "tlsPrivateKeyFile")),
    GoKey("commonConfig", S), GoKey("commonConfig.bridgeDeviceName", S),
    GoKey("commonConfig.bridgeDeviceIP", S),
    GoKey("commonConfig.pprofConfig", IGN, "Go profiling; runtime figures are at /debug/runtime "
                                           "and /metrics on commonConfig.adminAddress"),
    GoKey("modules", S),
    GoKey("modules.edgeDNS", S),
    GoKey("modules.edgeDNS.enable", S, "default true on every node (Go: on edge nodes only, "
                                       "where KUBERNETES_PORT is unset)"),
    GoKey("modules.edgeDNS.listenPort", S),
    GoKey("modules.edgeDNS.listenInterface", IGN, "modules.edgeDNS.listenAddress (default: "
                                                  "commonConfig.bridgeDeviceIP)"),
    GoKey("modules.edgeDNS.kubeAPIConfig", IGN, "internal copy; the top-level kubeAPIConfig "
                                                "is used"),
    GoKey("modules.edgeDNS.cacheDNS", S),
    GoKey("modules.edgeDNS.cacheDNS.enable", S, "caches the answers of the upstream servers"),
    GoKey("modules.edgeDNS.cacheDNS.upstreamServers", S),
    GoKey("modules.edgeDNS.cacheDNS.cacheTTL", S, "caps how long an answer stays cached"),
    GoKey("modules.edgeDNS.cacheDNS.autoDetect", IGN, "with no upstreamServers the host's "
                                                      "resolv.conf servers are the upstreams"),
    GoKey("modules.edgeProxy", S),
    GoKey("modules.edgeProxy.enable", S, "default true (Go: false unless the ConfigMap sets "
                                         "it)"),
    GoKey("modules.edgeProxy.serviceFilterMode", S),
    GoKey("modules.edgeProxy.listenInterface", IGN, "modules.edgeProxy.listenAddress (default: "
                                                    "commonConfig.bridgeDeviceIP)"),
    GoKey("modules.edgeProxy.socks5Proxy", R, "the SOCKS5 proxy (ssh to edge nodes by name) is "
                                              "not implemented; reach a node's port through a "
                                              "Service (type ClusterIP with endpoints on it)"),
    *(dataclasses.replace(k, path="modules.edgeProxy." + k.path) for k in _LB),
    GoKey("modules.edgeGateway", S), GoKey("modules.edgeGateway.enable", S),
    GoKey("modules.edgeGateway.nic", S), GoKey("modules.edgeGateway.includeIP", S),
    GoKey("modules.edgeGateway.excludeIP", S),
    *(dataclasses.replace(k, path="modules.edgeGateway." + k.path,
                          note=k.note or "the gateway balances by it (and its defaultPolicy) "
                                         "when set, else by modules.edgeProxy.loadBalancer")
      for k in _LB),
    GoKey("modules.edgeCNI", C), GoKey("modules.edgeCNI.enable", S,
                                       "remote Pod IPs carried through the tunnel (TCP), "
                                       "not the Go TUN overlay"),
    GoKey("modules.edgeCNI.meshCIDRConfig", C),
    *(GoKey(f"modules.edgeCNI.meshCIDRConfig.{k}", IGN, "one range here: "
            "modules.edgeCNI.meshCIDR (virtual Pod addresses)") for k in ("cloudCIDR", "edgeCIDR")),
    GoKey(_TUNNEL, S),
    GoKey(f"{_TUNNEL}.enable", S, "default true (Go: false unless the ConfigMap sets it)"),
    GoKey(f"{_TUNNEL}.listenPort", S),
    GoKey(f"{_TUNNEL}.relayNodes", S, "the listed agent relays and advertises those "
          "addresses; the other nodes use them, at listenPort, as servers"),
    GoKey(f"{_TUNNEL}.relayNodes[].nodeName", S),
    GoKey(f"{_TUNNEL}.relayNodes[].advertiseAddress", S),
    GoKey(f"{_TUNNEL}.psk", S), GoKey(f"{_TUNNEL}.psk.enable", S, "false is refused"),
    GoKey(f"{_TUNNEL}.psk.path", S),
    GoKey(f"{_TUNNEL}.mode", IGN, "internal: an agent relays when relayNodes lists it, a gateway "
                                  "never does"),
    GoKey(f"{_TUNNEL}.nodeName", IGN, "internal: the node name is nodeName / $NODE_NAME"),
    GoKey(f"{_TUNNEL}.transport", IGN, "libp2p's transport; the tunnel is one TCP port, "
                                       "modules.edgeTunnel.listenPort"),
    GoKey(f"{_TUNNEL}.rendezvous", IGN, "libp2p's discovery group; the PSK decides membership"),
    GoKey(f"{_TUNNEL}.enableIpfsLog", IGN, "libp2p's log; use -v / commonConfig.verbosity"),
    GoKey(f"{_TUNNEL}.maxCandidates", IGN, "every relay in relayNodes and servers is used"),
    GoKey(f"{_TUNNEL}.heartbeatPeriod", IGN, "every session sends keepalive pings"),
    GoKey(f"{_TUNNEL}.finderPeriod", IGN, "relays come from relayNodes and servers"),
    GoKey(f"{_TUNNEL}.configPath", IGN, "internal; a changed config takes effect on restart"),
    GoKey(f"{_TUNNEL}.listenInterfaces", IGN, "modules.edgeTunnel.listenAddress"),
    GoKey(f"{_TUNNEL}.extraFilteredInterfaces", IGN, "modules.edgeTunnel.advertiseAddresses "
                                                     "lists what peers should use"),
    GoKey(f"{_TUNNEL}.metricConfig", IGN, "Prometheus metrics are always at /metrics on "
                                          "commonConfig.adminAddress"),
    GoKey(f"{_TUNNEL}.tunnelLimitConfig", C),
    GoKey(f"{_TUNNEL}.tunnelLimitConfig.enable", IGN, _PER_PEER),
    GoKey(f"{_TUNNEL}.tunnelLimitConfig.tunnelBaseStreamIn", IGN, _PER_PEER),
    GoKey(f"{_TUNNEL}.tunnelLimitConfig.tunnelBaseStreamOut", IGN, _PER_PEER),
    GoKey(f"{_TUNNEL}.tunnelLimitConfig.tunnelPeerBaseStreamIn", M,
          target=f"{_TUNNEL}.maxStreamsPerPeer"),
    GoKey(f"{_TUNNEL}.tunnelLimitConfig.tunnelPeerBaseStreamOut", IGN, _PER_PEER),
)

_BY_PARENT: dict[str, dict[str, GoKey]] = {}
for _k in GO_KEYS:
    _BY_PARENT.setdefault(_k.parent, {})[_k.name] = _k


def covering(path: str) -> GoKey | None:
    """The Go key that decides ``path`` (itself, or the ignored section holding it)."""
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        key = _BY_PARENT.get(".".join(parts[:n - 1]), {}).get(parts[n - 1])
        if key is not None and (n == len(parts) or key.fate in (IGN, R)):
            return key
    return None


@dataclass
class Translation:
    """What ``translate`` found besides the rewritten document."""
    warnings: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    moves: list[tuple[str, Any]] = dataclasses.field(default_factory=list)


def translate(data: dict[str, Any], schema: type) -> tuple[dict[str, Any], Translation]:
    """``data`` with Go keys applied (see the module docstring), and what was said about it."""
    t = Translation()
    out = _walk(data, schema, "", "", t)
    for target, value in t.moves:
        _set_if_absent(out, target.split("."), value)
    return out, t


def _fields(cls: type | None) -> dict[str, Any]:
    if cls is None:
        return {}
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _canonical(key: str, ours: dict[str, Any], go: dict[str, GoKey]) -> str:
    if key in ours or key in go:
        return key
    folded = key.lower()
    for name in [*ours, *go]:
        if name.lower() == folded:
            return name
    return key


def _walk(data: dict[str, Any], cls: type | None, path: str, shown: str,
          t: Translation) -> dict[str, Any]:
    ours, go = _fields(cls), _BY_PARENT.get(path, {})
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            out[key] = value
            continue
        name = _canonical(key, ours, go)
        at = f"{shown}.{key}" if shown else key
        sub = f"{path}.{name}" if path else name
        gokey = go.get(name)
        if gokey is not None and gokey.fate is not S and name not in ours:
            _apply(gokey, value, at, sub, t)
            continue
        if name not in ours:
            if cls is None:
                t.problems.append(f"{at}: unknown key")
            else:
                out[key] = value  # the schema reports it as unknown
            continue
        if name != key:
            t.warnings.append(f"{at}: read as {name} (the spelling of this key here)")
        if name in out:
            t.warnings.append(f"{at}: given twice (in different cases); the last one counts")
        out[name] = _descend(ours[name], value, sub, f"{shown}.{name}" if shown else name, t)
    return out


def _descend(hint: Any, value: Any, path: str, shown: str, t: Translation) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return _walk(value, typing.cast(type, hint), path, shown, t)
    if typing.get_origin(hint) is list and isinstance(value, list):
        (item,) = typing.get_args(hint)
        if dataclasses.is_dataclass(item):
            return [_walk(v, typing.cast(type, item), f"{path}[]", f"{shown}[{i}]", t)
                    if isinstance(v, dict) else v for i, v in enumerate(value)]
    return value


def _apply(gokey: GoKey, value: Any, at: str, path: str, t: Translation) -> None:
    if gokey.fate is IGN:
        t.warnings.append(f"{at}: ignored (Go EdgeMesh key): {gokey.note}")
    elif gokey.fate is R:
        if isinstance(value, dict) and any(str(k).lower() == "enable" and v is True
                                           for k, v in value.items()):
            t.problems.append(f"{at}.enable: true is refused (Go EdgeMesh feature): "
                              f"{gokey.note}")
        else:
            t.warnings.append(f"{at}: ignored (Go EdgeMesh key, not enabled): {gokey.note}")
    elif gokey.fate is M:
        t.moves.append((gokey.target, value))
    elif isinstance(value, dict):
        _walk(value, None, path, at, t)
    elif value is not None:
        t.problems.append(f"{at}: expected a mapping, got {value!r}")


def _set_if_absent(data: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        nxt = data.get(part)
        if nxt is None:
            nxt = data[part] = {}
        if not isinstance(nxt, dict):
            return  # the schema reports the wrong type
        data = nxt
    data.setdefault(parts[-1], value)


def reference_rows() -> list[tuple[str, str]]:
    """(Go key, what it becomes here) for docs/configuration.md."""
    rows = []
    for k in GO_KEYS:
        if k.fate is S:
            fate = "honoured" + (f": {k.note}" if k.note else "")
        elif k.fate is M:
            fate = f"honoured as `{k.target}`"
        elif k.fate is IGN:
            fate = f"ignored, with a warning: {k.note}"
        elif k.fate is R:
            fate = f"`enable: true` exits 2: {k.note}; otherwise ignored, with a warning"
        else:
            fate = "a section: its keys below"
        rows.append((k.path, fate))
    return rows
