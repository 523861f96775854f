"""Interception rules: rendering is pure; applying is checked in a namespace, both backends."""
from __future__ import annotations

import shutil
import sys

import pytest

from edgemesh import config
from edgemesh.errors import ConfigError
from edgemesh.meta.models import PROXY_NAME_LABEL, Service, parse_service
from edgemesh.proxy import iptables
from edgemesh.proxy.iptables import (
    FILTER_HOOKS,
    NODE,
    Portal,
    cleanup_commands,
    hook_fixes,
    node_port_matches,
    render_rules,
)
from edgemesh.proxy.module import (
    BAD_SERVICE_IPS,
    node_port_of,
    proxied,
    service_ips,
    service_ips6,
)

P = [Portal("10.96.0.10", 80, "tcp", "169.254.96.16", 41000, 'shop/web:http "x"'),
     Portal("10.96.0.20", 53, "udp", "169.254.96.16", 41001, "kube-system/dns:dns")]


def test_render_owns_its_chains_and_one_dnat_per_portal() -> None:
    text = render_rules(P + P[:1])
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert [line for line in lines if line.startswith(":")] == [
        ":EDGEMESH-SERVICES - [0:0]", ":EDGEMESH-PREROUTING - [0:0]", ":EDGEMESH-OUTPUT - [0:0]",
        ":EDGEMESH-NODEPORTS - [0:0]",
        # mangle: TPROXY for UDP to the transparent listener (none among these portals)
        ":EDGEMESH-PREROUTING - [0:0]", ":EDGEMESH-OUTPUT - [0:0]", ":EDGEMESH-TPROXY - [0:0]",
        ":EDGEMESH-TPROXY-NODEPORTS - [0:0]", ":EDGEMESH-MARK - [0:0]",
        ":EDGEMESH-INPUT - [0:0]"]
    mangle = lines[lines.index("*mangle"):lines.index("*filter")]
    assert [line for line in mangle if line.startswith("-A")] == [
        "-A EDGEMESH-PREROUTING -d 127.0.0.0/8 ! -i lo -j RETURN",
        "-A EDGEMESH-PREROUTING -j EDGEMESH-TPROXY", "-A EDGEMESH-OUTPUT -j EDGEMESH-MARK"]
    dnat = [line for line in lines if "-j DNAT" in line]
    assert dnat == [
        '-A EDGEMESH-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment '
        '"shop/web:http x" -j DNAT --to-destination 169.254.96.16:41000',
        '-A EDGEMESH-SERVICES -d 10.96.0.20/32 -p udp -m udp --dport 53 -m comment --comment '
        '"kube-system/dns:dns" -j DNAT --to-destination 169.254.96.16:41001']
    # nothing outside our chains is ever written
    assert all(line.split()[1].startswith("EDGEMESH-") for line in lines if line.startswith("-A"))
    # no NodePort: declared, empty, never jumped to
    assert not any("NODEPORTS" in line for line in lines if line.startswith("-A"))
    # filter: one ACCEPT per listener, only for what our DNAT sent there
    assert lines[lines.index("*filter"):] == [
        "*filter", ":EDGEMESH-INPUT - [0:0]",
        "-A EDGEMESH-INPUT -d 169.254.96.16/32 -p tcp -m tcp --dport 41000 "
        "-m conntrack --ctstate DNAT -j ACCEPT",
        "-A EDGEMESH-INPUT -d 169.254.96.16/32 -p udp -m udp --dport 41001 "
        "-m conntrack --ctstate DNAT -j ACCEPT",
        "COMMIT"]


def test_render_is_deterministic() -> None:
    assert render_rules(P) == render_rules(list(reversed(P)))
    assert "DNAT" not in render_rules([])


SAVED = """*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:EDGEMESH-SERVICES - [0:0]
:EDGEMESH-OUTPUT - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A OUTPUT -j EDGEMESH-OUTPUT
-A OUTPUT -j EDGEMESH-OUTPUT
-A OUTPUT -j EDGEMESH-OUTPUT
COMMIT
"""


def test_hook_fixes_add_missing_and_drop_duplicates() -> None:
    assert hook_fixes(SAVED) == [
        "-I PREROUTING 1 -j EDGEMESH-PREROUTING",
        "-D OUTPUT -j EDGEMESH-OUTPUT",
        "-D OUTPUT -j EDGEMESH-OUTPUT"]
    # the fixes travel in their table's own transaction, after the chains are declared
    filter_fixes = hook_fixes("*filter\n:INPUT DROP [0:0]\nCOMMIT\n", FILTER_HOOKS)
    assert filter_fixes == ["-I INPUT 1 -j EDGEMESH-INPUT"]
    text = render_rules(P, hook_fixes(SAVED), (), filter_fixes)
    body = text.splitlines()
    nat_end = body.index("COMMIT")
    assert body[nat_end - 1] == "-D OUTPUT -j EDGEMESH-OUTPUT"
    assert body.index("-I PREROUTING 1 -j EDGEMESH-PREROUTING") > body.index(
        ":EDGEMESH-PREROUTING - [0:0]")
    assert body[-2:] == ["-I INPUT 1 -j EDGEMESH-INPUT", "COMMIT"]
    assert body.index(":EDGEMESH-INPUT - [0:0]") > nat_end
    fixed = SAVED.replace("-A OUTPUT -j EDGEMESH-OUTPUT\n", "", 2) + \
        "-A PREROUTING -j EDGEMESH-PREROUTING\n"
    assert hook_fixes(fixed) == []


def test_cleanup_commands_remove_only_ours() -> None:
    cmds = cleanup_commands(SAVED)
    assert cmds.count(["-t", "nat", "-D", "OUTPUT", "-j", "EDGEMESH-OUTPUT"]) == 3
    assert ["-t", "nat", "-X", "EDGEMESH-SERVICES"] in cmds
    assert ["-t", "nat", "-X", "EDGEMESH-PREROUTING"] not in cmds  # not present
    assert not any("KUBE-SERVICES" in c for cmd in cmds for c in cmd)
    assert cleanup_commands("*nat\nCOMMIT\n") == []
    saved_filter = "*filter\n:EDGEMESH-INPUT - [0:0]\n-A INPUT -j EDGEMESH-INPUT\nCOMMIT\n"
    assert cleanup_commands(saved_filter, "filter") == [
        ["-t", "filter", "-D", "INPUT", "-j", "EDGEMESH-INPUT"],
        ["-t", "filter", "-F", "EDGEMESH-INPUT"], ["-t", "filter", "-X", "EDGEMESH-INPUT"]]


@pytest.mark.netns
@pytest.mark.parametrize("binary", ["iptables-nft", "iptables-legacy"])
def test_sync_and_remove_in_a_namespace(lab, binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} not installed")
    ns = lab.netns("ipt")
    code = (
        "import sys; from edgemesh.proxy import iptables as I\n"
        f"r = I.Rules('{binary}')\n"
        "P = [I.Portal('10.96.0.10', 80, 'tcp', '169.254.96.16', 41000, 'a/b:http'),\n"
        "     I.Portal(I.NODE, 30080, 'tcp', '169.254.96.16', 41000, 'a/b:http'),\n"
        "     I.Portal('10.96.0.20', 53, 'udp', '169.254.96.16', 41001, 'a/d', tproxy=True),\n"
        "     I.Portal('100.64.0.0/10', 1, 'tcp', '169.254.96.16', 41000, 'cni/p', False, 65535),\n"
        "     I.Portal('100.64.0.0/10', 1, 'udp', '169.254.96.16', 41001, 'cni/p', True, 65535)]\n"
        "for _ in range(3): r.sync(P, ['192.168.0.0/16'])\n"
        "print(r.check(), *(I._save(r.binary, t) for t in I.TABLES))\n"
        "r.remove(); print('---'); print(*(I._save(r.binary, t) for t in I.TABLES))\n")
    out = ns.run(sys.executable, "-c", code).stdout
    before, after = out.split("---")
    assert before.startswith("True")  # what the kernel shows is what was applied
    assert before.count("-j TPROXY --on-port 41001 --on-ip 169.254.96.16") == 2
    assert before.count("-A EDGEMESH-MARK -d 10.96.0.20/32 -p udp") == 1
    # a steered range (the Edge CNI's remote Pods): every port, to the same listeners
    assert ('-A EDGEMESH-SERVICES -d 100.64.0.0/10 -p tcp -m tcp --dport 1:65535 -m comment '
            '--comment "cni/p" -j DNAT --to-destination 169.254.96.16:41000') in before
    assert "-A EDGEMESH-TPROXY -d 100.64.0.0/10 -p udp -m udp --dport 1:65535 " in before
    assert before.count("-A OUTPUT -j EDGEMESH-OUTPUT") == 2  # nat and mangle, once each
    assert before.count("-A PREROUTING -j EDGEMESH-PREROUTING") == 2
    assert before.count("-A INPUT -j EDGEMESH-INPUT") == 1
    assert before.count("--dport 41000 -m conntrack --ctstate DNAT -j ACCEPT") == 1
    assert before.count("--to-destination 169.254.96.16:41000") == 3
    assert before.count("-A EDGEMESH-SERVICES -d 192.168.0.0/16 -m addrtype --dst-type LOCAL "
                        "-j EDGEMESH-NODEPORTS") == 1
    assert "EDGEMESH" not in after


def test_detect_backend_prefers_the_one_with_rules(monkeypatch) -> None:
    counts = {"iptables-legacy": 12, "iptables-nft": 3}
    monkeypatch.setattr(iptables, "_rule_count", lambda b: counts[b])
    assert iptables.detect_backend() == "iptables-legacy"
    counts.update({"iptables-legacy": 0, "iptables-nft": 0})
    assert iptables.detect_backend() == "iptables-nft"
    counts.update({"iptables-legacy": -1, "iptables-nft": -1})
    assert iptables.detect_backend() == "iptables"


# ---- externalIPs, load-balancer IPs, NodePorts -------------------------------------------------

L = ("169.254.96.16", 41000)
WEB = "shop/web:80/tcp"
EXTRA = [Portal("10.96.0.10", 80, "tcp", *L, WEB),
         Portal("192.0.2.50", 80, "tcp", *L, WEB),          # externalIP
         Portal("203.0.113.7", 80, "tcp", *L, WEB),         # load-balancer ingress IP
         Portal(NODE, 30080, "tcp", *L, WEB),
         Portal(NODE, 30053, "udp", "169.254.96.16", 41001, "kube-system/dns:53/udp")]


def _rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("-A EDGEMESH-SERVICES -d")
            or line.startswith("-A EDGEMESH-SERVICES -m") or line.startswith("-A EDGEMESH-NODE")]


def test_render_service_ips_then_node_ports_on_any_local_address() -> None:
    c = ' -m comment --comment "shop/web:80/tcp" -j DNAT --to-destination 169.254.96.16:41000'
    assert _rules(render_rules(EXTRA)) == [
        "-A EDGEMESH-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80" + c,
        "-A EDGEMESH-SERVICES -d 192.0.2.50/32 -p tcp -m tcp --dport 80" + c,
        "-A EDGEMESH-SERVICES -d 203.0.113.7/32 -p tcp -m tcp --dport 80" + c,
        # last, as in kube-proxy: a local service IP is matched by its own port first
        "-A EDGEMESH-SERVICES -m addrtype --dst-type LOCAL -j EDGEMESH-NODEPORTS",
        '-A EDGEMESH-NODEPORTS -p udp -m udp --dport 30053 -m comment --comment '
        '"kube-system/dns:53/udp" -j DNAT --to-destination 169.254.96.16:41001',
        "-A EDGEMESH-NODEPORTS -p tcp -m tcp --dport 30080" + c]


def test_render_node_port_addresses_one_jump_per_range() -> None:
    text = render_rules(EXTRA, node_port_addresses=["192.168.50.7/24", "10.0.0.0/8",
                                                    "192.168.50.0/24"])
    jumps = [line for line in text.splitlines() if "-j EDGEMESH-NODEPORTS" in line]
    assert jumps == [  # host bits cleared, duplicates merged, sorted
        "-A EDGEMESH-SERVICES -d 10.0.0.0/8 -m addrtype --dst-type LOCAL -j EDGEMESH-NODEPORTS",
        "-A EDGEMESH-SERVICES -d 192.168.50.0/24 -m addrtype --dst-type LOCAL "
        "-j EDGEMESH-NODEPORTS"]
    assert node_port_matches(["10.0.0.0/8", "0.0.0.0/0"]) == [""]  # everything: no -d
    assert node_port_matches([]) == [""]
    # ranges given but no NodePort: no jump at all
    rules = render_rules(P, node_port_addresses=["10.0.0.0/8"]).splitlines()
    assert not any("NODEPORTS" in line for line in rules if line.startswith("-A"))


def _svc(type_: str = "ClusterIP", cluster_ip: str = "10.96.0.10", labels: dict | None = None,
         **extra: object) -> Service:
    meta = {"name": "web", "namespace": "shop", "labels": labels or {}}
    spec = {"type": type_, "clusterIP": cluster_ip,
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}], **extra}
    status = {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"},
                                           {"ip": "203.0.113.8", "ipMode": "Proxy"},
                                           {"ip": "fd00::1"}, {"hostname": "lb.example"}]}}
    return parse_service({"metadata": meta, "spec": spec, "status": status})


def test_service_ips_and_node_ports_follow_the_service_type() -> None:
    ext = {"externalIPs": ["192.0.2.50", "10.96.0.10", "fd00::2", "not-an-ip", "127.0.0.1",
                           "169.254.1.1", "224.0.0.1", "0.0.0.0"]}
    before = metrics_value()
    clusterip = _svc(**ext)
    assert service_ips(clusterip) == ["10.96.0.10", "192.0.2.50"]  # dup, v6 and junk dropped
    assert node_port_of(clusterip, clusterip.ports[0]) is None     # ClusterIP: no nodePort
    assert metrics_value() == before + 5  # junk counted once each, however often it is seen
    service_ips(clusterip)
    assert metrics_value() == before + 5
    nodeport = _svc("NodePort")
    assert service_ips(nodeport) == ["10.96.0.10"]  # ingress IPs are for LoadBalancers only
    assert node_port_of(nodeport, nodeport.ports[0]) == 30080
    lb = _svc("LoadBalancer", **ext)
    assert service_ips(lb) == ["10.96.0.10", "192.0.2.50", "203.0.113.7"]  # not ipMode Proxy
    assert node_port_of(lb, lb.ports[0]) == 30080


def test_services_left_to_kube_proxy_or_headless_get_nothing() -> None:
    label = {PROXY_NAME_LABEL: "kube-proxy"}
    assert proxied(_svc("LoadBalancer"), "FilterIfLabelExists")
    assert not proxied(_svc("LoadBalancer", labels=label), "FilterIfLabelExists")
    assert not proxied(_svc("NodePort"), "FilterIfLabelDoesNotExists")
    assert not proxied(_svc("NodePort", cluster_ip="None"), "FilterIfLabelExists")
    assert not proxied(_svc("ExternalName", externalName="x.example"), "FilterIfLabelExists")


def metrics_value() -> float:
    return BAD_SERVICE_IPS.value


@pytest.mark.parametrize("value, problem", [
    (["10.0.0.0/33"], '[0]: expected an IP network (CIDR), got "10.0.0.0/33"'),
    (["192.168.0.0/16", "fd00::/129"], '[1]: expected an IP network (CIDR), got "fd00::/129"'),
    (["fd00::/64", "fd00::g/64"], '[1]: expected an IP network (CIDR), got "fd00::g/64"'),
    (["eth0"], '[0]: expected an IP network (CIDR), got "eth0"'),
])
def test_node_port_addresses_are_validated(value: list[str], problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.from_mapping({"modules": {"edgeProxy": {"nodePortAddresses": value}}})
    assert e.value.problems == [f"modules.edgeProxy.nodePortAddresses{problem}"]
    both = ["10.1.2.3/8", "fd00:50::1/64"]  # IPv6 ranges are accepted beside IPv4 ones
    ok = config.from_mapping({"modules": {"edgeProxy": {"nodePortAddresses": both}}})
    assert ok.modules.edgeProxy.nodePortAddresses == both


def test_loopback_from_the_network_is_never_rewritten() -> None:
    # NodePorts on 127.0.0.1 serve clients on this node (OUTPUT) only: in PREROUTING a DNAT
    # would carry a packet for 127.x past the martian check (CVE-2020-8558)
    for text in (render_rules([]), render_rules(EXTRA, node_port_addresses=["127.0.0.0/8"])):
        lines = text.splitlines()
        guard = lines.index("-A EDGEMESH-PREROUTING -d 127.0.0.0/8 -j RETURN")
        assert guard < lines.index("-A EDGEMESH-PREROUTING -j EDGEMESH-SERVICES")
        assert not any("127.0.0.0/8" in line for line in lines if "OUTPUT" in line)


# ---- IPv6 (dual-stack services) ---------------------------------------------------------------

L6 = ("fd00:169:254:96::16", 41002)
P6 = [Portal("fd00:10:96::20", 80, "tcp", *L6, "shop/web:80/tcp/ipv6"),
      Portal("fd00:10:96::30", 7, "udp", L6[0], 41003, "shop/echo:7/udp/ipv6"),
      Portal(NODE, 30080, "tcp", *L6, "shop/web:80/tcp/ipv6")]


def _without_mangle(text: str) -> list[str]:
    lines = text.splitlines()
    return lines[:lines.index("*mangle")] + lines[lines.index("*filter"):]


def test_render_ipv6_ruleset_same_chains_bracketed_targets() -> None:
    lines = _without_mangle(render_rules(P6, family=6))
    assert [line for line in lines if line.startswith(":")] == [
        ":EDGEMESH-SERVICES - [0:0]", ":EDGEMESH-PREROUTING - [0:0]", ":EDGEMESH-OUTPUT - [0:0]",
        ":EDGEMESH-NODEPORTS - [0:0]", ":EDGEMESH-INPUT - [0:0]"]
    assert [line for line in lines if line.startswith("-A")] == [
        "-A EDGEMESH-PREROUTING -d ::1/128 -j RETURN",
        "-A EDGEMESH-PREROUTING -j EDGEMESH-SERVICES",
        "-A EDGEMESH-OUTPUT -j EDGEMESH-SERVICES",
        '-A EDGEMESH-SERVICES -d fd00:10:96::20/128 -p tcp -m tcp --dport 80 -m comment '
        '--comment "shop/web:80/tcp/ipv6" -j DNAT --to-destination [fd00:169:254:96::16]:41002',
        '-A EDGEMESH-SERVICES -d fd00:10:96::30/128 -p udp -m udp --dport 7 -m comment '
        '--comment "shop/echo:7/udp/ipv6" -j DNAT --to-destination [fd00:169:254:96::16]:41003',
        # NodePorts last, on every local IPv6 address (::1 only from this node: the guard)
        "-A EDGEMESH-SERVICES -m addrtype --dst-type LOCAL -j EDGEMESH-NODEPORTS",
        '-A EDGEMESH-NODEPORTS -p tcp -m tcp --dport 30080 -m comment --comment '
        '"shop/web:80/tcp/ipv6" -j DNAT --to-destination [fd00:169:254:96::16]:41002',
        "-A EDGEMESH-INPUT -d fd00:169:254:96::16/128 -p tcp -m tcp --dport 41002 "
        "-m conntrack --ctstate DNAT -j ACCEPT",
        "-A EDGEMESH-INPUT -d fd00:169:254:96::16/128 -p udp -m udp --dport 41003 "
        "-m conntrack --ctstate DNAT -j ACCEPT"]
    # the IPv4 rendering of IPv4 portals is untouched by the family parameter
    assert render_rules(EXTRA, family=4) == render_rules(EXTRA)


def test_detect_backend_for_ipv6_uses_the_ip6tables_variants(monkeypatch) -> None:
    counts = {"ip6tables-legacy": 4, "ip6tables-nft": 1}
    monkeypatch.setattr(iptables, "_rule_count", lambda b: counts[b])
    assert iptables.detect_backend(6) == "ip6tables-legacy"
    counts.update({"ip6tables-legacy": -1, "ip6tables-nft": 0})
    assert iptables.detect_backend(6) == "ip6tables-nft"
    counts.update({"ip6tables-legacy": -1, "ip6tables-nft": -1})
    assert iptables.detect_backend(6) == "ip6tables"
    assert iptables.of_family(["10.96.0.0/12", "fd00:10:96::/112"], 6) == ["fd00:10:96::/112"]


def test_service_ips6_keeps_usable_ipv6_addresses_canonical() -> None:
    svc = _svc("LoadBalancer", externalIPs=["fd00:192:0:0::50", "192.0.2.50", "::1", "fe80::1",
                                            "ff02::1", "::ffff:10.0.0.1", "junk"],
               clusterIPs=["10.96.0.10", "fd00:10:96::20"])
    before = metrics_value()
    assert service_ips6(svc) == ["fd00:10:96::20", "fd00:192::50", "fd00::1"]
    assert metrics_value() == before + 4  # ::1, fe80::1, ff02::1, mapped; junk is IPv4's
    assert service_ips(svc) == ["10.96.0.10", "192.0.2.50", "203.0.113.7"]  # IPv4 unchanged


@pytest.mark.parametrize("value, problem", [
    ("10.0.0.1", 'expected an IPv6 address or empty, got "10.0.0.1"'),
    ("::1", 'expected a unicast IPv6 address that is not loopback or link-local, got "::1"'),
    ("fe80::16", "expected a unicast IPv6 address that is not loopback or link-local, "
                 'got "fe80::16"'),
])
def test_bridge_device_ipv6_is_validated(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.from_mapping({"commonConfig": {"bridgeDeviceIPv6": value}})
    assert e.value.problems == [f"commonConfig.bridgeDeviceIPv6: {problem}"]
    assert config.from_mapping({}).commonConfig.bridgeDeviceIPv6 == "fd00:169:254:96::16"
    assert config.from_mapping({"commonConfig": {"bridgeDeviceIPv6": ""}}) \
        .commonConfig.bridgeDeviceIPv6 == ""


@pytest.mark.netns
@pytest.mark.parametrize("binary", ["ip6tables-nft", "ip6tables-legacy"])
def test_ipv6_sync_and_remove_in_a_namespace(lab, binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} not installed")
    ns = lab.netns("ip6t")
    code = (
        "from edgemesh.proxy import iptables as I\n"
        f"r = I.Rules('{binary}', family=6)\n"
        "P = [I.Portal('fd00:10:96::20', 80, 'tcp', 'fd00:169:254:96::16', 41000, 'a/b'),\n"
        "     I.Portal(I.NODE, 30080, 'tcp', 'fd00:169:254:96::16', 41000, 'a/b')]\n"
        "for _ in range(3): r.sync(P, ['192.168.0.0/16', 'fd00:50::/64'])\n"
        "print(I._save(r.binary), I._save(r.binary, 'filter'))\n"
        "r.remove(); print('---'); print(I._save(r.binary), I._save(r.binary, 'filter'))\n")
    before, after = ns.run(sys.executable, "-c", code).stdout.split("---")
    assert before.count("-A OUTPUT -j EDGEMESH-OUTPUT") == 1
    assert before.count("-A PREROUTING -j EDGEMESH-PREROUTING") == 1
    assert before.count("-A INPUT -j EDGEMESH-INPUT") == 1
    assert before.count("-d fd00:10:96::20/128 -p tcp -m tcp --dport 80 -m comment --comment "
                        '"a/b" -j DNAT --to-destination [fd00:169:254:96::16]:41000') == 1
    assert before.count("-A EDGEMESH-SERVICES -d fd00:50::/64 -m addrtype --dst-type LOCAL "
                        "-j EDGEMESH-NODEPORTS") == 1
    assert before.count("-A EDGEMESH-NODEPORTS -p tcp -m tcp --dport 30080 -m comment "
                        '--comment "a/b" -j DNAT --to-destination [fd00:169:254:96::16]:41000') == 1
    assert "EDGEMESH" not in after


def test_render_ipv6_node_ports_within_the_ipv6_ranges_only() -> None:
    mixed = ["192.168.50.0/24", "fd00:50::1/64", "fd00:51::/64", "fd00:50::/64"]
    jumps6 = [line for line in render_rules(P6, node_port_addresses=mixed, family=6)
              .splitlines() if "NODEPORTS" in line and line.startswith("-A")]
    assert jumps6 == [  # the IPv6 ranges, host bits cleared, deduplicated, sorted
        "-A EDGEMESH-SERVICES -d fd00:50::/64 -m addrtype --dst-type LOCAL -j EDGEMESH-NODEPORTS",
        "-A EDGEMESH-SERVICES -d fd00:51::/64 -m addrtype --dst-type LOCAL -j EDGEMESH-NODEPORTS",
        '-A EDGEMESH-NODEPORTS -p tcp -m tcp --dport 30080 -m comment --comment '
        '"shop/web:80/tcp/ipv6" -j DNAT --to-destination [fd00:169:254:96::16]:41002']
    # the same list gives IPv4 its IPv4 ranges, exactly as with those alone
    assert render_rules(EXTRA, node_port_addresses=mixed) == \
        render_rules(EXTRA, node_port_addresses=["192.168.50.0/24"])
    assert node_port_matches(["10.0.0.0/8", "::/0"], 6) == [""]  # everything: no -d
    assert node_port_matches([], 6) == [""]
    assert node_port_matches(["fd00::/8", "0.0.0.0/0"], 6) == ["-d fd00::/8 "]


def test_ranges_of_one_family_only_mean_no_node_ports_in_the_other() -> None:
    v4_only, v6_only = ["192.168.50.0/24"], ["fd00:50::/64"]
    assert node_port_matches(v4_only, 6) == [] and node_port_matches(v6_only, 4) == []
    assert not iptables.node_ports_enabled(v4_only, 6)
    assert iptables.node_ports_enabled(v4_only, 4) and iptables.node_ports_enabled([], 6)
    for text in (render_rules(P6, node_port_addresses=v4_only, family=6),
                 render_rules(EXTRA, node_port_addresses=v6_only)):
        rules = [line for line in text.splitlines() if line.startswith("-A")]
        assert not any("NODEPORTS" in line or "3008" in line or "30053" in line
                       for line in rules), rules
    # service addresses and listeners are untouched by it
    assert "-d fd00:10:96::20/128" in render_rules(P6, node_port_addresses=v4_only, family=6)
    assert "-d 10.96.0.10/32" in render_rules(EXTRA, node_port_addresses=v6_only)


def test_ipv6_loopback_from_the_network_is_never_rewritten() -> None:
    for ranges in ((), ("::1/128",), ("::/0",)):
        lines = render_rules(P6, node_port_addresses=ranges, family=6).splitlines()
        guard = lines.index("-A EDGEMESH-PREROUTING -d ::1/128 -j RETURN")
        assert guard < lines.index("-A EDGEMESH-PREROUTING -j EDGEMESH-SERVICES")
        assert not any("::1/128" in line for line in lines if "OUTPUT" in line)


# ---- incremental updates -----------------------------------------------------------------------

def _many(n: int, changed: int | None = None, node_ports: bool = True) -> list[Portal]:
    """Portals of ``n`` services (a ClusterIP each, every 10th with a NodePort), all led to
    one transparent listener; service ``changed`` has a new ClusterIP."""
    out = []
    for i in range(n):
        ip = f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"
        if i == changed:
            ip = "10.200.0.1"
        out.append(Portal(ip, 80, "tcp", *L, f"ns/svc{i}:80/tcp"))
        if node_ports and i % 10 == 0:
            out.append(Portal(NODE, 30000 + i // 10, "tcp", *L, f"ns/svc{i}:80/tcp"))
    return out


def test_one_service_changed_among_5000_is_two_rule_operations() -> None:
    base = iptables.ruleset(_many(5000))
    sets = base.sets
    assert len(sets["EDGEMESH-SERVICES"]) == 5000 and len(sets["EDGEMESH-INPUT"]) == 1
    delta = iptables.render_delta(base, iptables.ruleset(_many(5000, changed=1234)))
    assert delta is not None
    ops = [line for line in delta.splitlines() if line[:2] in ("-A", "-D", "-I")]
    assert ops == [
        '-D EDGEMESH-SERVICES -d 10.96.4.210/32 -p tcp -m tcp --dport 80 -m comment '
        '--comment "ns/svc1234:80/tcp" -j DNAT --to-destination 169.254.96.16:41000',
        # inserted first: before the NodePort jumps, which stay last
        '-I EDGEMESH-SERVICES 1 -d 10.200.0.1/32 -p tcp -m tcp --dport 80 -m comment '
        '--comment "ns/svc1234:80/tcp" -j DNAT --to-destination 169.254.96.16:41000']
    assert delta.splitlines()[0] == "*nat" and "*filter" not in delta  # listener unchanged
    # a service added (with a NodePort): its two rules; one removed: its one; nothing
    # changed: nothing at all
    added = iptables.render_delta(base, iptables.ruleset(_many(5001)))
    assert added is not None and sum(line.startswith("-") for line in added.splitlines()) == 2
    removed = iptables.render_delta(base, iptables.ruleset(_many(4999)))
    assert removed is not None and sum(line.startswith("-") for line in removed.splitlines()) \
        == 1
    assert iptables.render_delta(base, iptables.ruleset(list(reversed(_many(5000))))) == ""


def test_first_node_port_or_new_ranges_rewrite_the_chains_whole() -> None:
    without = iptables.ruleset(_many(20, node_ports=False))
    assert iptables.render_delta(without, iptables.ruleset(_many(20))) is None
    assert iptables.render_delta(iptables.ruleset(_many(20)),
                                 iptables.ruleset(_many(20), ["10.0.0.0/8"])) is None


def test_drift_is_seen_in_saved_rules() -> None:
    rules = iptables.ruleset(EXTRA)
    text = iptables.render_full(rules)
    nat, rest = text.split("*mangle")
    mangle, filt = rest.split("*filter")
    hooks = "-A PREROUTING -j EDGEMESH-PREROUTING\n-A OUTPUT -j EDGEMESH-OUTPUT\n"
    saved = {"nat": nat + hooks, "mangle": mangle + hooks,
             "filter": "*filter" + filt + "-A INPUT -j EDGEMESH-INPUT\n"}
    assert not iptables.drifted(rules, saved)
    # -save leaves out the quotes of a comment that needs none: not a drift
    assert not iptables.drifted(rules, {t: text.replace('"', "") for t, text in saved.items()})
    dnat = next(line for line in nat.splitlines() if "192.0.2.50" in line)
    assert iptables.drifted(rules, {**saved, "nat": saved["nat"].replace(dnat + "\n", "")})
    assert iptables.drifted(rules, {**saved, "nat": nat})  # the jumps removed
    assert iptables.drifted(rules, {**saved, "mangle": mangle})
    jump = "-A EDGEMESH-SERVICES -m addrtype --dst-type LOCAL -j EDGEMESH-NODEPORTS\n"
    moved = saved["nat"].replace(jump, "").replace(dnat + "\n", jump + dnat + "\n")
    assert iptables.drifted(rules, {**saved, "nat": moved})  # a DNAT after the NodePort jump
    assert iptables.drifted(rules, {**saved, "filter": saved["filter"].replace(
        "-A EDGEMESH-INPUT", "-A X", 1)})


@pytest.mark.netns
@pytest.mark.parametrize("binary", ["iptables-nft", "iptables-legacy"])
def test_one_change_among_5000_services_in_a_namespace(lab, binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} not installed")
    ns = lab.netns("ipt5k")
    code = (
        "from tests.unit.test_iptables import _many\n"
        "from edgemesh.proxy import iptables as I\n"
        f"r = I.Rules('{binary}')\n"
        "r.sync(_many(5000)); full = r.operations\n"
        "r.sync(_many(5000, changed=1234)); one = r.operations\n"
        "r.sync(_many(5000, changed=1234)); none = r.operations\n"
        "ok = r.check()\n"
        "saved = I._save(r.binary)\n"
        "r.remove()\n"
        "print(full, one, none, ok, saved.count('-j DNAT'), '10.200.0.1/32' in saved,\n"
        "      '10.96.4.210/32' in saved, 'EDGEMESH' in I._save(r.binary))\n")
    out = ns.run(sys.executable, "-c", code).stdout.split()
    assert out == ["5513", "2", "0", "True", "5500", "True", "False", "False"], out


def test_render_udp_under_tproxy_in_mangle_with_marks_for_this_node() -> None:
    udp = [Portal("10.96.0.20", 53, "udp", "169.254.96.16", 41005, "kube-system/dns:53/udp",
                  tproxy=True),
           Portal(NODE, 30053, "udp", "169.254.96.16", 41005, "kube-system/dns:53/udp",
                  tproxy=True)]
    text = render_rules([*EXTRA[:1], *udp], node_port_addresses=["192.168.50.0/24"])
    lines = text.splitlines()
    nat, mangle = lines[:lines.index("*mangle")], lines[lines.index("*mangle"):
                                                        lines.index("*filter")]
    assert not any("udp" in line for line in nat)  # nothing rewritten for UDP
    tproxy = "-j TPROXY --on-port 41005 --on-ip 169.254.96.16 --tproxy-mark 0x2000/0x2000"
    comment = '-m comment --comment "kube-system/dns:53/udp" '
    assert [line for line in mangle if line.startswith("-A")] == [
        "-A EDGEMESH-PREROUTING -d 127.0.0.0/8 ! -i lo -j RETURN",
        "-A EDGEMESH-PREROUTING -j EDGEMESH-TPROXY", "-A EDGEMESH-OUTPUT -j EDGEMESH-MARK",
        f"-A EDGEMESH-TPROXY -d 10.96.0.20/32 -p udp -m udp --dport 53 {comment}{tproxy}",
        "-A EDGEMESH-TPROXY -d 192.168.50.0/24 -m addrtype --dst-type LOCAL "
        "-j EDGEMESH-TPROXY-NODEPORTS",
        f"-A EDGEMESH-TPROXY-NODEPORTS -p udp -m udp --dport 30053 {comment}{tproxy}",
        # this node's own packets to the ClusterIP: marked, routed through lo to PREROUTING
        f"-A EDGEMESH-MARK -d 10.96.0.20/32 -p udp -m udp --dport 53 {comment}"
        "-j MARK --set-xmark 0x2000/0x2000"]
    assert "-A EDGEMESH-INPUT -p udp -m mark --mark 0x2000/0x2000 -j ACCEPT" in lines
    six = render_rules([Portal("fd00:10:96::30", 7, "udp", "fd00:169:254:96::16", 41003,
                               "shop/echo:7/udp/ipv6", tproxy=True)], family=6)
    assert ("-A EDGEMESH-TPROXY -d fd00:10:96::30/128 -p udp -m udp --dport 7 -m comment "
            '--comment "shop/echo:7/udp/ipv6" -j TPROXY --on-port 41003 '
            "--on-ip fd00:169:254:96::16 --tproxy-mark 0x2000/0x2000") in six
    assert "-A EDGEMESH-PREROUTING -d ::1/128 ! -i lo -j RETURN" in six
    # one UDP service more: two rule operations (its TPROXY and its MARK)
    base = iptables.ruleset(udp)
    more = iptables.ruleset([*udp, Portal("10.96.0.21", 53, "udp", "169.254.96.16", 41005,
                                          "x/y:53/udp", tproxy=True)])
    delta = iptables.render_delta(base, more)
    assert delta is not None and delta.startswith("*mangle\n") and \
        sum(line.startswith("-") for line in delta.splitlines()) == 2


def test_removal_is_one_transaction_jumps_then_flush_then_delete() -> None:
    saved = {"nat": SAVED, "mangle": "*mangle\n:EDGEMESH-MARK - [0:0]\n"
             "-A OUTPUT -j EDGEMESH-OUTPUT\nCOMMIT\n", "filter": "*filter\nCOMMIT\n"}
    assert iptables.removal_input(saved).splitlines() == [
        "*nat", "-D OUTPUT -j EDGEMESH-OUTPUT", "-D OUTPUT -j EDGEMESH-OUTPUT",
        "-D OUTPUT -j EDGEMESH-OUTPUT", "-F EDGEMESH-SERVICES", "-F EDGEMESH-OUTPUT",
        "-X EDGEMESH-SERVICES", "-X EDGEMESH-OUTPUT", "COMMIT",
        "*mangle", "-D OUTPUT -j EDGEMESH-OUTPUT", "-F EDGEMESH-MARK", "-X EDGEMESH-MARK",
        "COMMIT"]
    assert iptables.removal_input({"nat": "*nat\nCOMMIT\n"}) == ""
