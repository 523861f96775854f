"""The Go EdgeMesh's configs (checked in under tests/data/go_edgemesh/configs) load here: its
keys honoured, mapped, ignored with one warning each, or refused when they switch on a feature
we lack; a key nobody ever had is still an error."""
from __future__ import annotations

import dataclasses
import glob
import os
import typing

import pytest
import yaml
from click.testing import CliRunner

from edgemesh import cli, config_go
from edgemesh import config as cfg
from edgemesh.errors import ConfigError
from edgemesh.tunnel.links import relay_plan
from tests.procs import ROOT

GO_CONFIGS = os.path.join(ROOT, "tests", "data", "go_edgemesh", "configs")
BROKEN = "docs-config-items-gateway.yaml"  # trailing commas: invalid YAML for Go too
ALL = sorted(glob.glob(os.path.join(GO_CONFIGS, "*", "*.yaml")))
LOADABLE = [p for p in ALL if os.path.basename(p) != BROKEN]


def short(path: str) -> str:
    return os.path.relpath(path, GO_CONFIGS)


def validate(path: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli.main, ["config", "validate", path])


def leaf_paths(data: typing.Any, prefix: str = "") -> list[str]:
    """Every key path in a parsed document, list items as ``[]`` (like GO_KEYS)."""
    out = []
    if isinstance(data, dict):
        for k, v in data.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            out.append(path)
            out.extend(leaf_paths(v, path))
    elif isinstance(data, list):
        for v in data:
            out.extend(leaf_paths(v, f"{prefix}[]"))
    return out


def config_text(path: str) -> typing.Any:
    with open(path, encoding="utf-8") as f:
        return cfg._config_document([d for d in yaml.safe_load_all(f) if d is not None], path)


def test_the_data_covers_each_version_and_source() -> None:
    names = {short(p) for p in ALL}
    for version in ("v1.12.0", "v1.17.0"):
        for kind in ("agent", "gateway"):
            for flag in ("defaultconfig", "minconfig"):
                assert f"{version}/edgemesh-{kind}.{flag}.yaml" in names
            assert f"{version}/helm-edgemesh-{kind}-configmap.yaml" in names
            assert f"{version}/docs-config-items-{kind}.yaml" in names
    assert "v1.17.0/build-agent-04-configmap.yaml" in names


@pytest.mark.parametrize("path", LOADABLE, ids=short)
def test_every_go_config_validates_with_only_warnings(path: str) -> None:
    r = validate(path)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().startswith(f"{path}: valid"), r.output
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == len(r.stderr.splitlines()), r.stderr
    # one warning per ignored Go key the file holds, each naming the key as written
    keys = leaf_paths(config_text(path))
    ignored = [k for k in keys if (g := config_go.covering(_canon(k))) is not None
               and g.fate in (config_go.Fate.IGNORED, config_go.Fate.REFUSED_IF_ENABLED)
               and g.path == _canon(k)]
    assert sorted(w.split(": ")[1] for w in warned) == sorted(ignored), r.stderr


def _canon(path: str) -> str:
    """A key path with each part in the spelling GO_KEYS uses (Go matched in any case)."""
    known = {k.path.lower(): k.path for k in config_go.GO_KEYS}
    return known.get(path.lower(), path)


@pytest.mark.parametrize("path", LOADABLE, ids=short)
def test_every_key_of_every_go_config_has_a_fate(path: str) -> None:
    for key in leaf_paths(config_text(path)):
        if key in ("apiVersion", "kind"):
            continue
        assert config_go.covering(_canon(key)) is not None, key


def test_the_docs_gateway_example_is_bad_yaml_here_as_in_go() -> None:
    """The Go docs' gateway example ends lines with commas (``nic: "lo,eth0",``): yaml.v2
    rejects it too. Reported with its line; the same text without the commas loads."""
    for version in ("v1.12.0", "v1.17.0"):
        r = validate(os.path.join(GO_CONFIGS, version, BROKEN))
        assert r.exit_code == 2
        assert "not valid YAML" in r.stderr and "found ','" in r.stderr and "line" in r.stderr


def test_same_keys_exist_in_our_schema() -> None:
    for k in config_go.GO_KEYS:
        if k.fate is config_go.Fate.SAME:
            assert _schema_has(k.path.replace("[]", "")), k.path
        if k.fate is config_go.Fate.MAPPED:
            assert _schema_has(k.target), k.target


def _schema_has(path: str) -> bool:
    cls: typing.Any = cfg.Config
    for part in path.split("."):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
        if typing.get_origin(cls) is list:
            (cls,) = typing.get_args(cls)
    return True


# ---- meanings -----------------------------------------------------------------------------

def load(data: dict) -> tuple[cfg.Config, list[str]]:
    warnings: list[str] = []
    return cfg.from_mapping(data, warnings), warnings


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        cfg.from_mapping(data)
    return e.value.problems


def test_keys_match_in_any_case_as_in_go_with_a_warning_naming_the_spelling() -> None:
    c, warnings = load({"Modules": {"EdgeTunnel": {"ListenPort": 20007}}})
    assert c.modules.edgeTunnel.listenPort == 20007
    assert warnings == ["Modules: read as modules (the spelling of this key here)",
                        "modules.EdgeTunnel: read as edgeTunnel (the spelling of this key here)",
                        "modules.edgeTunnel.ListenPort: read as listenPort (the spelling of "
                        "this key here)"]


def test_a_key_nobody_had_is_still_an_error_even_among_go_keys() -> None:
    assert problems({"modules": {"edgeTunnel": {"transprot": "tcp"}}}) == [
        "modules.edgeTunnel.transprot: unknown key"]
    assert problems({"modules": {"edgeTunnel": {"tunnelLimitConfig": {"bogus": 1}}}}) == [
        "modules.edgeTunnel.tunnelLimitConfig.bogus: unknown key"]


def test_go_features_switched_on_exit_2_saying_what_to_use() -> None:
    [p] = problems({"modules": {"edgeProxy": {"socks5Proxy": {"enable": True}}}})
    assert p.startswith("modules.edgeProxy.socks5Proxy.enable: true is refused") and "SOCKS5" in p
    [p] = problems({"modules": {"edgeTunnel": {"psk": {"enable": False}}}})
    assert p.startswith("modules.edgeTunnel.psk.enable: false is refused")


def test_ignored_keys_warn_once_each_naming_what_replaces_them() -> None:
    c, warnings = load({"kubeAPIConfig": {"qps": 5, "Mode": "CloudMode"},
                        "modules": {"edgeCNI": {"enable": False, "meshCIDRConfig": {
                            "edgeCIDR": ["10.0.0.0/8"]}}}})
    assert c == cfg.Config()
    assert len(warnings) == 3
    assert warnings[1].startswith("kubeAPIConfig.Mode: ignored (Go EdgeMesh key): the metadata "
                                  "source is chosen without it")
    assert warnings[2].startswith("modules.edgeCNI.meshCIDRConfig.edgeCIDR: ignored (Go "
                                  "EdgeMesh key)")


def test_go_edge_cni_enable_is_ours() -> None:
    c, _ = load({"modules": {"edgeCNI": {"enable": True}}})
    assert c.modules.edgeCNI.enable


def test_tunnel_limit_and_cache_dns_map_onto_ours() -> None:
    c, warnings = load({"modules": {
        "edgeTunnel": {"tunnelLimitConfig": {"enable": True, "TunnelPeerBaseStreamIn": 77}},
        "edgeDNS": {"cacheDNS": {"enable": True, "upstreamServers": ["10.96.0.10"],
                                 "cacheTTL": 30, "autoDetect": True}}}})
    assert c.modules.edgeTunnel.maxStreamsPerPeer == 77
    assert c.modules.edgeDNS.cacheDNS.cacheTTL == 30
    assert c.modules.edgeDNS.cacheDNS.upstreamServers == ["10.96.0.10"]
    assert [w.split(":")[0] for w in warnings] == [
        "modules.edgeTunnel.tunnelLimitConfig.enable", "modules.edgeDNS.cacheDNS.autoDetect"]
    # our own key, when given too, wins over the mapped Go key
    c, _ = load({"modules": {"edgeTunnel": {"maxStreamsPerPeer": 5, "tunnelLimitConfig": {
        "tunnelPeerBaseStreamIn": 77}}}})
    assert c.modules.edgeTunnel.maxStreamsPerPeer == 5


def test_answer_cache_caps_ttl_at_cache_ttl() -> None:
    from dnslib import RR, DNSRecord

    from edgemesh.dns.cache import AnswerCache
    reply = DNSRecord.question("example.org").reply()
    reply.add_answer(*RR.fromZone("example.org. 300 IN A 192.0.2.1"))
    capped, free = AnswerCache(10, max_ttl=30), AnswerCache(10)
    assert capped.put("k", reply.pack(), 0.0).expires == 30.0  # type: ignore[union-attr]
    assert free.put("k", reply.pack(), 0.0).expires == 300.0  # type: ignore[union-attr]


def test_gateway_load_balancer_lands_where_the_gateway_reads_it() -> None:
    c, _ = load({"kind": "EdgeMeshGateway", "modules": {"edgeGateway": {"loadBalancer": {
        "consistentHash": {"partitionCount": 7}, "defaultPolicy": "RANDOM"}}}})
    assert c.modules.edgeGateway.loadBalancer.defaultPolicy == "RANDOM"
    assert c.modules.edgeGateway.loadBalancer.consistentHash.partitionCount == 7


# ---- relayNodes ---------------------------------------------------------------------------

RELAYS = {"modules": {"edgeTunnel": {"relayNodes": [
    {"nodeName": "k8s-master", "advertiseAddress": ["1.1.1.1"]},
    {"nodeName": "ke-edge1", "advertiseAddress": ["2.2.2.2", "3.3.3.3:30006", "fd00::1"]}]}}}


def plan(node: str, data: dict = RELAYS, may_relay: bool = True):  # type: ignore[no-untyped-def]
    c, _ = load(data)
    return relay_plan(c.modules.edgeTunnel, node, may_relay)


def test_a_listed_agent_relays_and_advertises_its_addresses() -> None:
    assert plan("k8s-master") == (True, ["2.2.2.2:20006", "3.3.3.3:30006", "[fd00::1]:20006"],
                                  ["1.1.1.1"])
    assert plan("ke-edge1") == (True, ["1.1.1.1:20006"], ["2.2.2.2", "3.3.3.3", "fd00::1"])


def test_every_other_node_uses_every_relay_as_a_server_without_servers() -> None:
    assert plan("edge-9") == (False, ["1.1.1.1:20006", "2.2.2.2:20006", "3.3.3.3:30006",
                                      "[fd00::1]:20006"], [])


def test_a_gateway_never_relays_as_in_go_client_only_mode() -> None:
    assert plan("k8s-master", may_relay=False) == (
        False, ["2.2.2.2:20006", "3.3.3.3:30006", "[fd00::1]:20006"], [])


def test_relay_nodes_add_to_servers_at_the_listen_port() -> None:
    data = {"modules": {"edgeTunnel": {"listenPort": 21000, "servers": ["9.9.9.9:20004"],
                                       "advertiseAddresses": ["5.5.5.5"], "relayNodes": [
                                           {"nodeName": "r", "advertiseAddress": ["1.1.1.1"]}]}}}
    assert plan("x", data) == (False, ["9.9.9.9:20004", "1.1.1.1:21000"], ["5.5.5.5"])
    assert plan("r", data) == (True, ["9.9.9.9:20004"], ["5.5.5.5", "1.1.1.1"])


def test_relay_node_addresses_are_checked() -> None:
    assert problems({"modules": {"edgeTunnel": {"relayNodes": [
        {"nodeName": "r", "advertiseAddress": ["1.1.1.1", "a b"]}]}}}) == [
        'modules.edgeTunnel.relayNodes[0].advertiseAddress[1]: expected an IP address or host '
        'name, got "a b"']
    assert problems({"modules": {"edgeTunnel": {"relayNodes": [{"nodename": "r", "x": 1}]}}}) \
        == ["modules.edgeTunnel.relayNodes[0].x: unknown key"]


# ---- files and flags ------------------------------------------------------------------------

def test_a_configmap_with_two_config_files_is_refused(tmp_path) -> None:
    path = tmp_path / "two.yaml"
    cm = {"kind": "ConfigMap", "data": {"a.yaml": "{}", "b.yaml": "{}"}}
    path.write_text(yaml.safe_dump_all([cm]))
    r = validate(str(path))
    assert r.exit_code == 2 and "hold 2 config files (a.yaml, b.yaml); give one" in r.stderr
    path.write_text("a: 1\n---\nb: 2\n")
    assert "expected one YAML document, found 2" in validate(str(path)).stderr


def test_go_default_config_paths_are_used_when_present() -> None:
    seen: list[str] = []

    def exists(p: str) -> bool:
        seen.append(p)
        return p.endswith("edgemesh-gateway.yaml")
    assert cli.default_config_file("EdgeMeshAgent", exists) is None
    assert cli.default_config_file("EdgeMeshGateway", exists) == \
        "/etc/edgemesh/config/edgemesh-gateway.yaml"
    assert seen == ["/etc/edgemesh/config/edgemesh-agent.yaml",
                    "/etc/edgemesh/config/edgemesh-gateway.yaml"]
    assert cli.default_config_file("EdgeMeshServer", exists) is None


def test_config_file_is_an_alias_of_config() -> None:
    r = CliRunner().invoke(cli.main, ["agent", "--config-file", "/nonexistent/x.yaml"])
    assert r.exit_code == 2 and "/nonexistent/x.yaml: cannot read" in r.stderr


def test_defaults_are_unchanged_by_the_go_table() -> None:
    assert dataclasses.asdict(cfg.from_mapping({})) == dataclasses.asdict(cfg.Config())


def test_gateway_balancers_read_edge_gateway_load_balancer():
    from edgemesh.gateway.module import _balancing
    c, _ = load({"kind": "EdgeMeshGateway", "modules": {"edgeGateway": {"loadBalancer": {
        "defaultPolicy": "RANDOM"}}}})
    assert _balancing(c).loadBalancer.defaultPolicy == "RANDOM"
    plain, _ = load({"kind": "EdgeMeshGateway", "modules": {"edgeProxy": {"loadBalancer": {
        "defaultPolicy": "RANDOM"}}}})
    assert _balancing(plain) is plain.modules.edgeProxy  # the earlier, documented place
