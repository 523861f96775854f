"""Typed configuration: defaults, YAML loading, validation with key paths, commented rendering.

The schema is a tree of dataclasses. Each field carries its documentation and, where a plain
type is not enough, a checker. One walker (``_build``) turns a YAML mapping into the tree and
collects *every* problem with its key path; unknown keys are problems too. ``render_default``
walks the same tree to print a complete commented YAML file, so docs cannot drift from code.

Precedence: defaults < file < environment (``NODE_NAME``) < flags (applied by the CLI through
``apply_overrides``).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from edgemesh import doc_limits
from edgemesh.errors import ConfigError

Checker = Callable[[Any], "str | None"]


def opt(default: Any, doc: str, check: Checker | None = None, factory: bool = False) -> Any:
    """A documented config field; ``check`` returns a problem text or None."""
    meta = {"doc": doc, "check": check}
    if factory or isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: typing.cast(Any, type(value))(value), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc, "check": None})


# ---- checkers ---------------------------------------------------------------------------------

def shown(v: Any) -> str:
    """A value as the user wrote it: JSON-ish quoting, so ``"abc"`` reads as a string."""
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def port(v: int) -> str | None:
    return None if 1 <= v <= 65535 else f"expected an integer 1-65535, got {shown(v)}"


port.expect = "an integer 1-65535"  # type: ignore[attr-defined]


def positive(v: float) -> str | None:
    return None if v > 0 else f"expected a positive number, got {shown(v)}"


def one_of(*choices: str) -> Checker:
    def check(v: str) -> str | None:
        return None if v in choices else f"expected one of {', '.join(choices)}, got {shown(v)}"
    return check


def host_port(v: str) -> str | None:
    """HOST:PORT (``[v6]:port`` for IPv6); empty means "off"."""
    if v == "":
        return None
    try:
        split_host_port(v)
    except ValueError as e:
        return str(e)
    return None


def each(check: Checker) -> Checker:
    """A list checker applying ``check`` to every item; problems name the item (``key[1]``)."""
    def check_items(v: list[Any]) -> str | None:
        for i, item in enumerate(v):
            problem = check(item)
            if problem:
                return f"[{i}]: {problem}"
        return None
    check_items.per_item = True  # type: ignore[attr-defined]
    return check_items


def _host_port_item(v: str) -> str | None:
    return "expected HOST:PORT, got \"\"" if v == "" else host_port(v)


host_ports = each(_host_port_item)


def ip_address(v: str) -> str | None:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return f"expected an IP address, got {shown(v)}"
    return None


def cidr(v: str) -> str | None:
    try:
        ipaddress.ip_network(v, strict=False)
    except ValueError:
        return f"expected an IP network (CIDR), got {shown(v)}"
    return None


cidrs = each(cidr)


def ipv6_service_listener(v: str) -> str | None:
    """Empty, or an IPv6 address that can hold the proxy's IPv6 listeners (not loopback,
    link-local, multicast or unspecified: DNAT from other hosts must be able to reach it)."""
    if v == "":
        return None
    try:
        addr = ipaddress.IPv6Address(v)
    except ValueError:
        return f"expected an IPv6 address or empty, got {shown(v)}"
    if addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified:
        return f"expected a unicast IPv6 address that is not loopback or link-local, " \
               f"got {shown(v)}"
    return None


def dns_name(v: str) -> str | None:
    labels = v.rstrip(".").split(".")
    if not v or any(not lab or len(lab) > 63 for lab in labels):
        return f"expected a DNS domain name, got {shown(v)}"
    return None


def split_host_port(v: str) -> tuple[str, int]:
    """``"1.2.3.4:53"`` → ``("1.2.3.4", 53)``; ``"[::1]:53"`` → ``("::1", 53)``."""
    host, sep, port_text = v.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {shown(v)}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port_text)
    if not 0 <= number <= 65535:
        raise ValueError(f"expected HOST:PORT with a port 0-65535, got {shown(v)}")
    return host, number


# ---- schema -----------------------------------------------------------------------------------

@dataclass
class MetaServerSecurity:
    requireAuthorization: bool = opt(False, "Talk HTTPS with client certificates to the "
                                            "metaServer.")
    insecureSkipTLSVerify: bool = opt(False, "Skip verifying the metaServer's certificate.")
    tlsCaFile: str = opt("/etc/edgemesh/metaserver/rootCA.crt", "CA bundle for the metaServer.")
    tlsCertFile: str = opt("/etc/edgemesh/metaserver/server.crt", "Client certificate.")
    tlsPrivateKeyFile: str = opt("/etc/edgemesh/metaserver/server.key", "Client private key.")


@dataclass
class MetaServer:
    server: str = opt("http://127.0.0.1:10550", "KubeEdge edge metaServer URL (edgecore).")
    security: MetaServerSecurity = section(MetaServerSecurity, "TLS settings for the metaServer.")


@dataclass
class KubeAPIConfig:
    master: str = opt("", "API server URL (e.g. the metaServer http://127.0.0.1:10550). "
                          "Empty with no kubeConfig and no manifests: in-cluster if available.")
    kubeConfig: str = opt("", "Path of a kubeconfig file for list+watch.")
    manifests: list[str] = opt([], "Directories of manifests: the standalone metadata source "
                                   "(used instead of an API server when set).")
    resyncBackoffMaxSeconds: float = opt(30.0, "Upper bound of the reconnect backoff.", positive)
    metaServer: MetaServer = section(MetaServer, "KubeEdge metaServer connection.")


@dataclass
class CommonConfig:
    bridgeDeviceName: str = opt("edgemesh0", "Bridge device the agent creates for its own address.")
    bridgeDeviceIP: str = opt("169.254.96.16", "The agent's link-local address (DNS listens here).",
                              ip_address)
    bridgeDeviceIPv6: str = opt("fd00:169:254:96::16", "The agent's IPv6 address on the bridge "
                                "device (a ULA /128, added only while IPv6 service addresses "
                                "are served; the proxy's IPv6 listeners bind it); empty: IPv6 "
                                "service addresses are not intercepted.", ipv6_service_listener)
    stateDir: str = opt("/var/lib/edgemesh", "Identity key and metadata cache live here.")
    adminAddress: str = opt("127.0.0.1:10557", "Admin HTTP endpoint (/livez, /readyz, /metrics, "
                                               "/debug); empty disables it.", host_port)
    logFormat: str = opt("text", "Log format on stderr.", one_of("text", "json"))
    verbosity: int = opt(2, "Log verbosity (klog-like: 0 quiet .. 6 wire detail).",
                         lambda v: None if 0 <= v <= 10 else f"expected 0-10, got {shown(v)}")


@dataclass
class CacheDNS:
    enable: bool = opt(True, "Cache answers from upstream servers.")
    upstreamServers: list[str] = opt([], "Upstream DNS servers (IP or IP:PORT); empty: the host's "
                                         "resolv.conf without our own address.")
    cacheSize: int = opt(10000, "Maximum cached upstream answers.", positive)
    maxOutstanding: int = opt(1000, "Maximum upstream queries in flight.", positive)
    upstreamTimeout: float = opt(1.0, "Seconds before an upstream query fails.", positive)
    cacheTTL: int = opt(0, "Most seconds an upstream answer stays cached (the Go EdgeMesh's "
                           "cacheTTL); 0: the answer's own TTL (at most a day).",
                        lambda v: None if v >= 0 else f"expected >= 0, got {shown(v)}")


@dataclass
class EdgeDNS:
    enable: bool = opt(True, "Answer cluster names on this node and forward the rest.")
    listenAddress: str = opt("", "Address to listen on; empty: commonConfig.bridgeDeviceIP.")
    listenPort: int = opt(53, "UDP and TCP port.", port)
    zone: str = opt("cluster.local", "The cluster's DNS domain.", dns_name)
    ttl: int = opt(30, "TTL of cluster answers in seconds.",
                   lambda v: None if 0 <= v <= 3600 else f"expected 0-3600, got {shown(v)}")
    allowedClients: list[str] = opt([], "Client networks allowed besides this node's own "
                                        "addresses (CIDRs); empty: this node only.", cidrs)
    cacheDNS: CacheDNS = section(CacheDNS, "Forwarding of names outside the cluster zone.")


@dataclass
class ConsistentHash:
    partitionCount: int = opt(100, "Partitions on the hash ring.", positive)
    replicationFactor: int = opt(10, "Virtual nodes per endpoint.", positive)
    load: float = opt(1.25, "Bounded-load factor (max share over the mean).",
                      lambda v: None if v >= 1.0 else f"expected a number >= 1.0, got {shown(v)}")


@dataclass
class LoadBalancer:
    consistentHash: ConsistentHash = section(ConsistentHash, "Ring parameters.")
    defaultPolicy: str = opt("ROUND_ROBIN", "Policy when no DestinationRule says otherwise.",
                             one_of("ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"))
    preferLocal: bool = opt(False, "Prefer endpoints on this node when there are any.")


@dataclass
class EdgeProxy:
    enable: bool = opt(True, "Intercept service traffic and forward it to endpoints.")
    serviceCIDR: list[str] = opt(["10.96.0.0/12"], "Service IP ranges (routes are added for them).",
                                 cidrs)
    listenAddress: str = opt("", "Address of the proxy's listeners (the transparent ones "
                             "iptables leads to; one per port with iptables off); empty: "
                             "bridgeDeviceIP.")
    iptables: bool = opt(True, "Manage iptables rules (off: listeners only).")
    iptablesSyncPeriod: float = opt(30.0, "Seconds between rule resyncs that repair drift.",
                                    positive)
    serviceFilterMode: str = opt("FilterIfLabelExists", "Which services to leave alone, by the "
                                 "service.edgemesh.kubeedge.io/service-proxy-name label.",
                                 one_of("FilterIfLabelExists", "FilterIfLabelDoesNotExists"))
    connectTimeout: float = opt(5.0, "Seconds to connect to one endpoint.", positive)
    tcpIdleTimeout: float = opt(3600.0, "Seconds a TCP connection may stay idle.", positive)
    udpIdleTimeout: float = opt(60.0, "Seconds a UDP session may stay idle.", positive)
    maxUDPSessions: int = opt(4096, "Maximum UDP sessions per service port.", positive)
    maxConnections: int = opt(20000, "Maximum proxied TCP connections.", positive)
    perRequestHTTP: bool = opt(False, "Balance HTTP ports per request instead of per connection.")
    nodePortAddresses: list[str] = opt([], "IPv4 and IPv6 ranges whose local addresses accept "
                                       "NodePort traffic (like kube-proxy's "
                                       "--nodeport-addresses), each family's ranges for its "
                                       "own services' addresses; empty: every local address "
                                       "(127.0.0.0/8 and ::1 only for clients on this node); "
                                       "ranges of one family only: no NodePorts in the other.",
                                       cidrs)
    httpHeaderTimeout: float = opt(30.0, "Seconds a client may take to send one request head "
                                   "(per-request HTTP).", positive)
    httpIdleTimeout: float = opt(120.0, "Seconds a keep-alive HTTP client may wait between "
                                 "requests (per-request HTTP).", positive)
    httpResponseTimeout: float = opt(60.0, "Seconds an endpoint may take to start its response "
                                     "before the client gets 504 (per-request HTTP).", positive)
    loadBalancer: LoadBalancer = section(LoadBalancer, "Load balancing.")


def psk_required(v: bool) -> str | None:
    return None if v else ("false is refused: this tunnel never runs unauthenticated (every "
                           "peer proves the cluster PSK); remove the key and give the PSK file "
                           "in modules.edgeTunnel.psk.path")


def relay_address(v: str) -> str | None:
    """An IP address, a DNS host name, or either as HOST:PORT (a relay's advertised address)."""
    if v and not any(c.isspace() for c in v) and dns_name(v) is None:
        return None
    return f"expected an IP address or host name, got {shown(v)}"


@dataclass
class RelayNode:
    nodeName: str = opt("", "Name of a node that relays for the others.")
    advertiseAddress: list[str] = opt([], "Its addresses (IP or host name; the tunnel port is "
                                          "listenPort unless given as HOST:PORT).",
                                      each(relay_address))


@dataclass
class PSK:
    enable: bool = opt(True, "Must be true: every peer proves the cluster pre-shared key "
                             "(false, as the Go EdgeMesh allowed, is refused).", psk_required)
    path: str = opt("/etc/edgemesh/psk", "File holding the pre-shared key.")


@dataclass
class EdgeTunnel:
    enable: bool = opt(True, "Reach endpoints on other nodes through the tunnel.")
    listenAddress: str = opt("0.0.0.0", "Address the tunnel listens on.", ip_address)
    listenPort: int = opt(20006, "Tunnel port (also the port used towards servers).", port)
    servers: list[str] = opt([], "Rendezvous/relay servers HOST:PORT.", host_ports)
    relay: bool = opt(False, "This agent also relays for others.")
    holePunching: bool = opt(True, "Try TCP hole punching, coordinated by a server, before "
                                   "relaying a peer behind another NAT.")
    advertiseAddresses: list[str] = opt([], "Extra addresses peers may use to reach this node.")
    relayNodes: list[RelayNode] = opt([], "The Go EdgeMesh's relay list ({nodeName, "
                                      "advertiseAddress}): the listed node relays (as relay: "
                                      "true) and advertises those addresses; every other node "
                                      "uses each listed relay's addresses as servers.",
                                      factory=True)
    psk: PSK = section(PSK, "Cluster membership key.")
    maxStreamsPerPeer: int = opt(1024, "Streams a peer may open to us at once.", positive)
    relayBytesPerSecond: int = opt(50_000_000, "Per-peer relay bandwidth limit.", positive)
    relayMaxCircuits: int = opt(64, "Per-peer relay circuits limit.", positive)
    relayMaxCircuitsTotal: int = opt(1024, "Relay circuits this node holds at once for all "
                                           "peers together (more are refused).", positive)
    relayIdleTimeout: float = opt(300.0, "Seconds a relay circuit may carry no byte before "
                                         "it is closed.", positive)


@dataclass
class EdgeGateway:
    enable: bool = opt(False, "Run the ingress gateway (edgemesh gateway turns this on).")
    nic: str = opt("*", "Interfaces to listen on: '*' or comma-separated names.")
    includeIP: str = opt("*", "IPs/CIDRs to listen on: '*' or comma-separated.")
    excludeIP: str = opt("*", "IPs/CIDRs never to listen on: '*' (none) or comma-separated.")
    labels: dict[str, str] = opt({"kubeedge": "edgemesh-gateway"},
                                 "This gateway's labels, matched by Gateway spec.selector "
                                 "(a Gateway with an empty selector applies everywhere).")
    maxConnections: int = opt(10000, "Maximum client connections.", positive)
    requestHeaderTimeout: float = opt(10.0, "Seconds a client has to send a request head "
                                            "(slow clients get 408).", positive)
    idleTimeout: float = opt(60.0, "Seconds a kept-alive client connection may sit idle.",
                             positive)
    clientTimeout: float = opt(60.0, "Seconds a client may stall while sending a body.",
                               positive)
    handshakeTimeout: float = opt(10.0, "Seconds for a TLS ClientHello and handshake.",
                                  positive)
    upstreamTimeout: float = opt(60.0, "Seconds to wait for a response head when the route "
                                       "sets no timeout.", positive)
    connectTimeout: float = opt(5.0, "Seconds to connect to one endpoint.", positive)
    maxHeaderBytes: int = opt(16384, "Largest request head accepted (bigger: 431).", positive)
    maxHeaderFields: int = opt(100, "Most header fields in a request head.", positive)
    maxRequestBodyBytes: int = opt(0, "Largest request body (bigger: 413); 0: no limit.",
                                   lambda v: None if v >= 0 else f"expected >= 0, got {v}")
    tcpIdleTimeout: float = opt(3600.0, "Seconds a TCP, passthrough or WebSocket connection "
                                        "may stay idle.", positive)
    interfaceResync: float = opt(10.0, "Seconds between re-reads of the interfaces' "
                                       "addresses.", positive)
    loadBalancer: LoadBalancer = section(LoadBalancer, "The gateway's load balancing (the Go "
                                         "EdgeMesh's edgeGateway.loadBalancer); when left at "
                                         "its defaults the gateway uses "
                                         "modules.edgeProxy.loadBalancer.")


DEFAULT_MESH_CIDR = "100.127.0.0/16"  # the last /16 of 100.64.0.0/10 (shared address space)


def check_mesh_cidr(value: str) -> str | None:
    """Why ``value`` is not a usable mesh range (None when it is): an IPv4 network of at least
    4 addresses and at most a /8, in private, shared or reserved space."""
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return f"expected an IPv4 network (CIDR), got {value!r}"
    if net.version != 4:
        return f"expected an IPv4 network, got {value!r} (IPv6 is not carried yet)"
    if not 8 <= net.prefixlen <= 30:
        return f"expected a prefix length between /8 and /30, got {value!r}"
    if net.is_loopback or net.is_link_local or net.is_multicast or net.is_unspecified \
            or net.is_global:
        return (f"expected a private or shared range (e.g. {DEFAULT_MESH_CIDR}), got {value!r}: "
                "a public, loopback, link-local or multicast range would shadow real hosts")
    return None


@dataclass
class EdgeCNI:
    enable: bool = opt(False, "Carry connections to remote Pod IPs that the kernel cannot "
                       "route through the tunnel (TCP and UDP), and let peers dial this node's own "
                       "Pods at any port (edgemesh/proxy/podip.py).")
    meshCIDR: str = opt(DEFAULT_MESH_CIDR, "IPv4 range the agent takes virtual Pod addresses "
                        "from (a stable address per Pod, derived from namespace/name; "
                        "edgemesh/proxy/meshcidr.py). Must not be used by any network a node "
                        "reaches: the default is the last /16 of the RFC 6598 shared space.",
                        check_mesh_cidr)
    mode: str = opt("auto", "What DNS answers for a Pod on another node: auto (its virtual "
                    "address when its IP collides with another Pod's or this node's, or does "
                    "not reach it from here), podIP (always the real IP), virtual (always "
                    "the virtual address).", one_of("auto", "podIP", "virtual"))
    headlessProxy: bool = opt(False, "Default of the annotation edgemesh.kubeedge.io/"
                              "headless-proxy: a headless Service's name resolves to a "
                              "virtual address balanced like a ClusterIP, port mapping "
                              "included (the legacy EdgeMesh behaviour; needs enable).")


@dataclass
class Modules:
    edgeDNS: EdgeDNS = section(EdgeDNS, "Node-local DNS.")
    edgeProxy: EdgeProxy = section(EdgeProxy, "Service proxy.")
    edgeTunnel: EdgeTunnel = section(EdgeTunnel, "Node-to-node tunnel.")
    edgeGateway: EdgeGateway = section(EdgeGateway, "Ingress gateway.")
    edgeCNI: EdgeCNI = section(EdgeCNI, "Edge CNI: remote Pod IPs through the tunnel.")


@dataclass
class Server:
    listen: str = opt("0.0.0.0:20004", "Rendezvous/relay listen address.", host_port)
    advertise: list[str] = opt([], "Addresses agents should use for this server.", host_ports)
    relayBytesPerSecond: int = opt(50_000_000, "Per-peer relay bandwidth limit (bytes/s).",
                                   positive)
    relayMaxCircuits: int = opt(64, "Relay circuits one peer may hold at once.", positive)
    relayMaxCircuitsTotal: int = opt(1024, "Relay circuits held at once for all peers "
                                           "together (more are refused).", positive)
    relayIdleTimeout: float = opt(300.0, "Seconds a relay circuit may carry no byte before "
                                         "it is closed.", positive)
    maxSessions: int = opt(10000, "Agent sessions held at once (more connections are "
                                  "refused).", positive)


@dataclass
class Config:
    apiVersion: str = opt("agent.edgemesh.config.kubeedge.io/v1alpha1", "Config schema version.")
    kind: str = opt("EdgeMeshAgent", "EdgeMeshAgent, EdgeMeshGateway or EdgeMeshServer.",
                    one_of("EdgeMeshAgent", "EdgeMeshGateway", "EdgeMeshServer"))
    nodeName: str = opt("", "This node's name; empty: $NODE_NAME, then the hostname.")
    kubeAPIConfig: KubeAPIConfig = section(KubeAPIConfig, "Where cluster metadata comes from.")
    commonConfig: CommonConfig = section(CommonConfig, "Settings shared by every module.")
    modules: Modules = section(Modules, "The agent's modules, each with enable.")
    server: Server = section(Server, "edgemesh server (rendezvous and relay) settings.")


# ---- loading ----------------------------------------------------------------------------------

def _type_name(t: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "a boolean (true/false)",
             str: "a string"}
    if t in names:
        return names[t]
    origin = typing.get_origin(t)
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return "a mapping"


def _coerce(value: Any, t: Any, path: str, problems: list[str]) -> Any:
    """Check ``value`` against type ``t``; returns the value or ``_BAD``."""
    if dataclasses.is_dataclass(t):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {shown(value)}")
            return _BAD
        return _build(t, value, path, problems)  # type: ignore[arg-type]
    origin = typing.get_origin(t)
    if origin is list:
        (item_t,) = typing.get_args(t)
        if value is None:
            return []
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {shown(value)}")
            return _BAD
        items = [_coerce(v, item_t, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return _BAD if _BAD in items else items
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            problems.append(f"{path}: expected a mapping of strings, got {shown(value)}")
            return _BAD
        return dict(value)
    ok = (isinstance(value, t) and not (t is int and isinstance(value, bool))
          or (t is float and isinstance(value, int) and not isinstance(value, bool)))
    if not ok:
        problems.append(f"{path}: expected {_type_name(t)}, got {shown(value)}")
        return _BAD
    return float(value) if t is float else value


_BAD = object()


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            problems.append(f"{prefix}{'.' if prefix else ''}{key}: unknown key")
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        if name not in data:
            continue
        path = f"{prefix}{'.' if prefix else ''}{name}"
        check = f.metadata.get("check")
        found: list[str] = []
        value = _coerce(data[name], hints[name], path, found)
        expect = getattr(check, "expect", None)
        if value is _BAD and expect and len(found) == 1:
            found = [f"{path}: expected {expect}, got {shown(data[name])}"]
        problems.extend(found)
        if value is _BAD:
            continue
        problem = check(value) if check else None
        if problem:
            problems.append(_at(path, problem))
            continue
        kwargs[name] = value
    return cls(**kwargs)


def _at(path: str, problem: str) -> str:
    return f"{path}{problem}" if problem.startswith("[") else f"{path}: {problem}"


def from_mapping(data: Any, warnings: list[str] | None = None) -> Config:
    """Build a Config from parsed YAML; raises ConfigError listing every problem.

    Go EdgeMesh keys are applied first (``edgemesh.config_go``); what they say is appended to
    ``warnings`` when given.
    """
    from edgemesh import config_go
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): expected a mapping, got {type(data).__name__}"])
    data, said = config_go.translate(data, Config)
    problems = list(said.problems)
    config = _build(Config, data, "", problems)
    if problems:
        raise ConfigError(problems)
    if warnings is not None:
        warnings.extend(said.warnings)
    return typing.cast(Config, config)


def load(path: str | None, warnings: list[str] | None = None) -> Config:
    """Defaults, overlaid with the YAML file at ``path`` when given (see ``from_mapping``)."""
    if not path:
        return Config()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        _check_bounds(docs, len(text), path)
        data = _config_document(docs, path)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from e
    except UnicodeDecodeError as e:  # found by tests/fuzz (config target)
        raise ConfigError([f"{path}: not UTF-8 text (byte {e.start})"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from e
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply"]) from None
    return from_mapping(data, warnings)


def _check_bounds(docs: list[Any], text_len: int, path: str) -> None:
    for doc in docs:
        why = doc_limits.problem(doc, text_len)
        if why:
            raise ConfigError([f"{path}: refused: the document {why}"])


def _config_document(docs: list[Any], path: str) -> Any:
    """The config in a file: its one document, or the config file held by a ConfigMap in it
    (``kubectl get configmap edgemesh-agent-cfg -o yaml`` output, the Go EdgeMesh's build/)."""
    held = [(name, text) for d in docs if isinstance(d, dict) and d.get("kind") == "ConfigMap"
            and isinstance(d.get("data"), dict)
            for name, text in d["data"].items()
            if str(name).endswith((".yaml", ".yml")) and isinstance(text, str)]
    if len(held) == 1:
        inner = yaml.safe_load(held[0][1])
        _check_bounds([inner], len(held[0][1]), f"{path}: {held[0][0]}")
        return inner
    if len(held) > 1:
        raise ConfigError([f"{path}: its ConfigMaps hold {len(held)} config files "
                           f"({', '.join(n for n, _ in held)}); give one"])
    if len(docs) > 1:
        raise ConfigError([f"{path}: expected one YAML document, found {len(docs)}"])
    return docs[0] if docs else None


def set_path(config: Any, path: str, value: Any) -> None:
    """Set ``a.b.c`` to ``value`` after checking it like a file value would be."""
    *parents, last = path.split(".")
    target = config
    for part in parents:
        target = getattr(target, part)
    f = {f.name: f for f in dataclasses.fields(target)}[last]
    hint = typing.get_type_hints(type(target))[last]
    problems: list[str] = []
    value = _coerce(value, hint, path, problems)
    check = f.metadata.get("check")
    if not problems and check and (problem := check(value)):
        problems.append(_at(path, problem))
    if problems:
        raise ConfigError(problems)
    setattr(target, last, value)


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Apply environment then flag values (``key.path → value``; None means "not given").

    ``NODE_NAME`` overrides the file's ``nodeName``; ``--node-name`` overrides both; with
    neither, the hostname.
    """
    problems: list[str] = []
    if os.environ.get("NODE_NAME"):
        config.nodeName = os.environ["NODE_NAME"]
    for path, value in overrides.items():
        if value is None:
            continue
        try:
            set_path(config, path, value)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    if not config.nodeName:
        import socket  # here, not at the top: config is imported by the sans-IO cores

        config.nodeName = socket.gethostname()
    return config


# ---- rendering --------------------------------------------------------------------------------

def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return str(text).removesuffix("\n...").removesuffix("...").strip()


def render(config: Any, indent: int = 0) -> str:
    """A commented YAML rendering of ``config`` (every key, with its documentation)."""
    lines: list[str] = []
    pad = "  " * indent
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        lines.append(f"{pad}# {f.metadata['doc']}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.append(render(value, indent + 1))
        else:
            lines.append(f"{pad}{f.name}: {_yaml_scalar(value)}")
    return "\n".join(lines)


def render_default() -> str:
    return "# EdgeMesh configuration (edgemesh config default)\n" + render(Config()) + "\n"


def reference_rows(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, default, doc) for every leaf key: the README's config reference."""
    rows: list[tuple[str, str, str]] = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        default = getattr(cls(), f.name)
        if dataclasses.is_dataclass(default):
            rows.extend(reference_rows(type(default), path + "."))
        else:
            rows.append((path, _yaml_scalar(default), f.metadata["doc"]))
    return rows

