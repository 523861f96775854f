"""Config: checkers, key paths, unknown keys, precedence through the CLI, default round trip."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from edgemesh import cli
from edgemesh import config as cfg
from edgemesh.errors import ConfigError
from tests.procs import ROOT


def problems_of(data) -> list[str]:
    with pytest.raises(ConfigError) as e:
        cfg.from_mapping(data)
    return e.value.problems


def one_problem(data) -> str:
    [problem] = problems_of(data)
    return problem


# ---- checkers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("check, good, bad, message", [
    (cfg.port, [1, 53, 65535], [0, 65536, -1], "expected an integer 1-65535"),
    (cfg.positive, [0.1, 1, 10**6], [0, -1.5], "expected a positive number"),
    (cfg.one_of("text", "json"), ["text", "json"], ["xml", ""], "expected one of text, json"),
    (cfg.host_port, ["", "1.2.3.4:53", "[::1]:53", "localhost:80", ":80"],
     ["1.2.3.4", "1.2.3.4:", "1.2.3.4:x", "1.2.3.4:70000", "nonsense"], "expected HOST:PORT"),
    (cfg.ip_address, ["127.0.0.1", "::1", "169.254.96.16"], ["", "localhost", "1.2.3"],
     "expected an IP address"),
    (cfg.cidr, ["10.0.0.0/8", "10.1.2.3/8", "fd00::/64", "1.2.3.4"], ["10.0.0.0/33", "x"],
     "expected an IP network (CIDR)"),
    (cfg.dns_name, ["cluster.local", "cluster.local.", "a"], ["", "a..b", "x" * 64 + ".io"],
     "expected a DNS domain name"),
])
def test_checkers(check, good, bad, message):
    for value in good:
        assert check(value) is None, value
    for value in bad:
        problem = check(value)
        assert problem and message in problem, (value, problem)


def test_list_checkers_name_the_item():
    assert cfg.cidrs(["10.0.0.0/8", "nope"]) == '[1]: expected an IP network (CIDR), got "nope"'
    assert cfg.host_ports(["1.2.3.4:1", ""]) == '[1]: expected HOST:PORT, got ""'
    assert cfg.cidrs([]) is None and cfg.host_ports([]) is None


def test_split_host_port():
    assert cfg.split_host_port("1.2.3.4:53") == ("1.2.3.4", 53)
    assert cfg.split_host_port("[fd00::1]:8080") == ("fd00::1", 8080)
    assert cfg.split_host_port(":80") == ("", 80)
    with pytest.raises(ValueError, match="with a port 0-65535"):
        cfg.split_host_port("1.2.3.4:65536")


# ---- loading ----------------------------------------------------------------------------------

def test_empty_and_null_documents_are_the_defaults():
    assert cfg.from_mapping(None) == cfg.Config()
    assert cfg.from_mapping({}) == cfg.Config()
    assert one_problem({"modules": None}) == "modules: expected a mapping, got null"


def test_values_are_set_and_typed():
    c = cfg.from_mapping({
        "nodeName": "edge-1", "modules": {
            "edgeDNS": {"listenPort": 1053, "allowedClients": None,
                        "cacheDNS": {"upstreamTimeout": 2, "upstreamServers": ["1.1.1.1"]}},
            "edgeProxy": {"serviceCIDR": ["10.96.0.0/16"], "iptables": False},
            "edgeGateway": {"labels": {"a": "b"}}},
        "kubeAPIConfig": {"manifests": ["/m1", "/m2"]}})
    assert c.nodeName == "edge-1" and c.modules.edgeDNS.listenPort == 1053
    assert c.modules.edgeDNS.allowedClients == []  # null list: empty
    timeout = c.modules.edgeDNS.cacheDNS.upstreamTimeout
    assert timeout == 2.0 and isinstance(timeout, float)
    assert c.modules.edgeDNS.cacheDNS.upstreamServers == ["1.1.1.1"]
    assert c.modules.edgeProxy.serviceCIDR == ["10.96.0.0/16"] and not c.modules.edgeProxy.iptables
    assert c.modules.edgeGateway.labels == {"a": "b"}
    assert c.kubeAPIConfig.manifests == ["/m1", "/m2"]
    assert c.modules.edgeTunnel.listenPort == 20006  # untouched keys keep their defaults


def test_defaults_are_not_shared_between_configs():
    a, b = cfg.Config(), cfg.Config()
    a.modules.edgeProxy.serviceCIDR.append("10.0.0.0/8")
    assert b.modules.edgeProxy.serviceCIDR == ["10.96.0.0/12"]


@pytest.mark.parametrize("data, problem", [
    ({"modules": {"edgeTunnel": {"listenPort": "abc"}}},
     'modules.edgeTunnel.listenPort: expected an integer 1-65535, got "abc"'),
    ({"modules": {"edgeTunnel": {"listenPort": 0}}},
     "modules.edgeTunnel.listenPort: expected an integer 1-65535, got 0"),
    ({"modules": {"edgeTunnel": {"listenPort": True}}},
     "modules.edgeTunnel.listenPort: expected an integer 1-65535, got true"),
    ({"modules": {"edgeDNS": {"enable": "yes"}}},
     'modules.edgeDNS.enable: expected a boolean (true/false), got "yes"'),
    ({"modules": {"edgeDNS": {"zone": 5}}}, "modules.edgeDNS.zone: expected a string, got 5"),
    ({"modules": {"edgeDNS": {"ttl": 7200}}}, "modules.edgeDNS.ttl: expected 0-3600, got 7200"),
    ({"modules": {"edgeDNS": {"cacheDNS": {"upstreamTimeout": "1s"}}}},
     'modules.edgeDNS.cacheDNS.upstreamTimeout: expected a number, got "1s"'),
    ({"modules": {"edgeDNS": {"cacheDNS": {"cacheSize": 0}}}},
     "modules.edgeDNS.cacheDNS.cacheSize: expected a positive number, got 0"),
    ({"modules": {"edgeDNS": {"allowedClients": "10.0.0.0/8"}}},
     'modules.edgeDNS.allowedClients: expected a list, got "10.0.0.0/8"'),
    ({"modules": {"edgeDNS": {"allowedClients": ["10.0.0.0/8", 7]}}},
     "modules.edgeDNS.allowedClients[1]: expected a string, got 7"),
    ({"modules": {"edgeProxy": {"serviceCIDR": ["10.96.0.0/12", "nope"]}}},
     'modules.edgeProxy.serviceCIDR[1]: expected an IP network (CIDR), got "nope"'),
    ({"modules": {"edgeTunnel": {"servers": ["relay:20004", "relay"]}}},
     'modules.edgeTunnel.servers[1]: expected HOST:PORT, got "relay"'),
    ({"modules": {"edgeProxy": {"loadBalancer": {"consistentHash": {"load": 0.5}}}}},
     "modules.edgeProxy.loadBalancer.consistentHash.load: expected a number >= 1.0, got 0.5"),
    ({"modules": {"edgeGateway": {"labels": {"a": 1}}}},
     'modules.edgeGateway.labels: expected a mapping of strings, got {"a": 1}'),
    ({"commonConfig": {"bridgeDeviceIP": "x"}},
     'commonConfig.bridgeDeviceIP: expected an IP address, got "x"'),
    ({"commonConfig": {"logFormat": "xml"}},
     'commonConfig.logFormat: expected one of text, json, got "xml"'),
    ({"commonConfig": "quiet"}, 'commonConfig: expected a mapping, got "quiet"'),
    ({"kind": "EdgeMeshRouter"},
     'kind: expected one of EdgeMeshAgent, EdgeMeshGateway, EdgeMeshServer, got "EdgeMeshRouter"'),
    ({"server": {"advertise": ["1.2.3.4"]}},
     'server.advertise[0]: expected HOST:PORT, got "1.2.3.4"'),
    ({"bogus": 1}, "bogus: unknown key"),
    ({"modules": {"edgeDNS": {"cacheDNS": {"sizee": 1}}}},
     "modules.edgeDNS.cacheDNS.sizee: unknown key"),
    ({"modules": {"edgeMesh": {}}}, "modules.edgeMesh: unknown key"),
])
def test_each_problem_names_its_key_path(data, problem):
    assert one_problem(data) == problem


def test_every_problem_is_reported_at_once():
    found = problems_of({"bogus": 1, "modules": {
        "edgeTunnel": {"listenPort": "abc", "psk": {"enable": "maybe", "extra": 1}},
        "edgeDNS": []}, "commonConfig": {"verbosity": 11}})
    assert sorted(found) == sorted([
        "bogus: unknown key",
        'modules.edgeTunnel.listenPort: expected an integer 1-65535, got "abc"',
        "modules.edgeTunnel.psk.extra: unknown key",
        'modules.edgeTunnel.psk.enable: expected a boolean (true/false), got "maybe"',
        "modules.edgeDNS: expected a mapping, got []",
        "commonConfig.verbosity: expected 0-10, got 11"])


def test_top_level_must_be_a_mapping():
    assert one_problem(["a"]) == "(top level): expected a mapping, got list"


def test_load_reports_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        cfg.load(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("modules: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        cfg.load(str(tmp_path / "bad.yaml"))
    assert cfg.load(None) == cfg.Config()


def test_set_path_checks_like_a_file_value():
    c = cfg.Config()
    cfg.set_path(c, "modules.edgeDNS.listenPort", 1053)
    assert c.modules.edgeDNS.listenPort == 1053
    with pytest.raises(ConfigError) as e:
        cfg.set_path(c, "modules.edgeDNS.listenPort", 0)
    assert e.value.problems == ["modules.edgeDNS.listenPort: expected an integer 1-65535, got 0"]
    with pytest.raises(ConfigError) as e:
        cfg.set_path(c, "modules.edgeTunnel.servers", ["ok:1", "bad"])
    assert e.value.problems == ['modules.edgeTunnel.servers[1]: expected HOST:PORT, got "bad"']


def test_reference_rows_cover_every_leaf():
    rows = {path: default for path, default, _ in cfg.reference_rows()}
    assert rows["modules.edgeTunnel.listenPort"] == "20006"
    assert rows["modules.edgeProxy.serviceCIDR"] == "[10.96.0.0/12]"
    assert all(doc for _, _, doc in cfg.reference_rows())


# ---- default config ---------------------------------------------------------------------------

def test_default_config_is_complete_commented_and_valid(tmp_path):
    text = cfg.render_default()
    data = yaml.safe_load(text)
    assert cfg.from_mapping(data) == cfg.Config()
    for path, _, doc in cfg.reference_rows():
        assert f"# {doc}" in text, path
    result = CliRunner().invoke(cli.main, ["config", "default"])
    assert result.exit_code == 0 and result.output == text
    (tmp_path / "default.yaml").write_text(result.output)
    result = CliRunner().invoke(cli.main, ["config", "validate", str(tmp_path / "default.yaml")])
    assert result.exit_code == 0 and "valid" in result.output


def test_validate_exits_2_listing_every_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("modules:\n  edgeTunnel:\n    listenPort: abc\n  edgeDNS:\n    bogus: 1\n")
    result = CliRunner().invoke(cli.main, ["config", "validate", str(path)])
    assert result.exit_code == 2
    assert 'error: modules.edgeTunnel.listenPort: expected an integer 1-65535, got "abc"' in \
        result.stderr
    assert "error: modules.edgeDNS.bogus: unknown key" in result.stderr
    result = CliRunner().invoke(cli.main, ["config", "validate", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "cannot read" in result.stderr


# ---- precedence through the CLI ---------------------------------------------------------------

@pytest.fixture
def captured(monkeypatch):
    """Run ``edgemesh agent`` up to the point it would start; return the Config it built."""
    from edgemesh import agent
    from edgemesh.runtime import logs
    seen: dict[str, cfg.Config] = {}

    def fake_run(config, role="agent"):
        seen["config"] = config
        return 0

    monkeypatch.setattr(agent, "run", fake_run)
    monkeypatch.setattr(logs, "setup", lambda *a, **k: None)
    monkeypatch.delenv("NODE_NAME", raising=False)

    def invoke(args, env=None):
        result = CliRunner().invoke(cli.main, ["agent", *args], env=env or {})
        assert result.exit_code == 0, result.output + result.stderr
        return seen.pop("config")
    return invoke


def test_precedence_defaults_file_env_flags(tmp_path, captured):
    conf = tmp_path / "c.yaml"
    conf.write_text("nodeName: from-file\ncommonConfig: {verbosity: 3}\n"
                    "kubeAPIConfig: {manifests: [/from-file]}\n")
    assert captured([]).nodeName == socket.gethostname()
    assert captured([]).commonConfig.verbosity == 2
    assert captured([], env={"NODE_NAME": "from-env"}).nodeName == "from-env"
    c = captured(["--config", str(conf)])
    assert (c.nodeName, c.commonConfig.verbosity, c.kubeAPIConfig.manifests) == \
        ("from-file", 3, ["/from-file"])
    assert captured(["--config", str(conf)], env={"NODE_NAME": "from-env"}).nodeName == \
        "from-env"
    c = captured(["--config", str(conf), "--node-name", "from-flag", "-v", "5",
                  "--manifests", "/a", "--manifests", "/b"], env={"NODE_NAME": "from-env"})
    assert (c.nodeName, c.commonConfig.verbosity, c.kubeAPIConfig.manifests) == \
        ("from-flag", 5, ["/a", "/b"])


def test_agent_flags_map_to_config_keys(tmp_path, captured):
    c = captured(["--dns-listen", "127.0.0.1:1053", "--tunnel-listen", "[::]:20007",
                  "--no-iptables", "--service-cidr", "10.0.0.0/16", "--server", "relay:20004",
                  "--relay", "--psk-file", "/psk", "--state-dir", str(tmp_path),
                  "--admin", "127.0.0.1:0", "--log-format", "json", "--master", "http://m:1",
                  "--kubeconfig", "/kc", "--nodeport-addresses", "192.168.1.0/24",
                  "--nodeport-addresses", "fd00:1::/64"])
    m = c.modules
    assert (m.edgeDNS.listenAddress, m.edgeDNS.listenPort) == ("127.0.0.1", 1053)
    assert (m.edgeTunnel.listenAddress, m.edgeTunnel.listenPort) == ("::", 20007)
    assert not m.edgeProxy.iptables and m.edgeProxy.serviceCIDR == ["10.0.0.0/16"]
    assert m.edgeProxy.nodePortAddresses == ["192.168.1.0/24", "fd00:1::/64"]
    assert m.edgeTunnel.servers == ["relay:20004"] and m.edgeTunnel.relay
    assert m.edgeTunnel.psk.path == "/psk" and c.commonConfig.stateDir == str(tmp_path)
    assert (c.commonConfig.adminAddress, c.commonConfig.logFormat) == ("127.0.0.1:0", "json")
    assert (c.kubeAPIConfig.master, c.kubeAPIConfig.kubeConfig) == ("http://m:1", "/kc")
    assert c.kind == "EdgeMeshAgent"


@pytest.mark.parametrize("args, message", [
    (["--dns-listen", "nonsense"], 'error: --dns-listen: expected HOST:PORT, got "nonsense"'),
    (["--tunnel-listen", "1.2.3.4:99999"],
     'error: --tunnel-listen: expected HOST:PORT with a port 0-65535, got "1.2.3.4:99999"'),
    (["--dns-listen", "127.0.0.1:0"],
     "error: modules.edgeDNS.listenPort: expected an integer 1-65535, got 0"),
    (["--admin", "nonsense"], 'error: commonConfig.adminAddress: expected HOST:PORT'),
    (["--server", "relay"], 'error: modules.edgeTunnel.servers[0]: expected HOST:PORT'),
    (["--service-cidr", "10.0.0.0/99"], "error: modules.edgeProxy.serviceCIDR[0]: expected"),
    (["--nodeport-addresses", "lan"], "error: modules.edgeProxy.nodePortAddresses[0]: expected"),
    (["-v", "11"], "error: commonConfig.verbosity: expected 0-10, got 11"),
    (["-v", "abc"], "'abc' is not a valid integer"),
    (["--log-format", "xml"], "'xml' is not one of 'text', 'json'"),
    (["--no-such-flag"], "No such option '--no-such-flag'"),
])
def test_bad_flags_exit_2_naming_the_flag_or_key(args, message, captured):
    result = CliRunner().invoke(cli.main, ["agent", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_bad_config_file_exits_2_as_a_real_process(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("modules:\n  edgeTunnel:\n    listenPort: abc\n")
    proc = subprocess.run([sys.executable, "-m", "edgemesh", "agent", "--config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == \
        'error: modules.edgeTunnel.listenPort: expected an integer 1-65535, got "abc"'


# ---- help -------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["agent"], ["server"], ["gateway"], ["status"],
                                     ["config"], ["config", "default"], ["config", "validate"],
                                     ["cleanup"], ["version"]])
def test_help_of_every_command(command):
    result = CliRunner().invoke(cli.main, [*command, "--help"])
    assert result.exit_code == 0 and "Usage: " in result.output
    if command == ["agent"]:
        for flag in ("--manifests", "--node-name", "--dns-listen", "--no-iptables", "--admin",
                     "--log-format", "--kubeconfig", "--master", "--state-dir", "--server"):
            assert flag in result.output
    if not command:
        assert "edgemesh agent --manifests" in result.output
