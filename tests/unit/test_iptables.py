"""Interception rules: rendering is pure; applying is checked in a namespace, both backends."""
from __future__ import annotations

import shutil

import pytest

from edgemesh.proxy import iptables
from edgemesh.proxy.iptables import Portal, cleanup_commands, hook_fixes, render_rules

P = [Portal("10.96.0.10", 80, "tcp", "169.254.96.16", 41000, 'shop/web:http "x"'),
     Portal("10.96.0.20", 53, "udp", "169.254.96.16", 41001, "kube-system/dns:dns")]


def test_render_owns_three_chains_and_one_dnat_per_portal() -> None:
    text = render_rules(P + P[:1])
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert [line for line in lines if line.startswith(":")] == [
        ":EDGEMESH-SERVICES - [0:0]", ":EDGEMESH-PREROUTING - [0:0]", ":EDGEMESH-OUTPUT - [0:0]"]
    dnat = [line for line in lines if "DNAT" in line]
    assert dnat == [
        '-A EDGEMESH-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment '
        '"shop/web:http x" -j DNAT --to-destination 169.254.96.16:41000',
        '-A EDGEMESH-SERVICES -d 10.96.0.20/32 -p udp -m udp --dport 53 -m comment --comment '
        '"kube-system/dns:dns" -j DNAT --to-destination 169.254.96.16:41001']
    # nothing outside our chains is ever written
    assert all(line.split()[1].startswith("EDGEMESH-") for line in lines if line.startswith("-A"))


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
    # the fixes travel in the rules' own transaction, after the chains are declared
    text = render_rules(P, hook_fixes(SAVED))
    body = text.splitlines()
    assert body[-1] == "COMMIT" and body[-2] == "-D OUTPUT -j EDGEMESH-OUTPUT"
    assert body.index("-I PREROUTING 1 -j EDGEMESH-PREROUTING") > body.index(
        ":EDGEMESH-PREROUTING - [0:0]")
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


@pytest.mark.netns
@pytest.mark.parametrize("binary", ["iptables-nft", "iptables-legacy"])
def test_sync_and_remove_in_a_namespace(lab, binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} not installed")
    ns = lab.netns("ipt")
    code = (
        "import sys; from edgemesh.proxy import iptables as I\n"
        f"r = I.Rules('{binary}')\n"
        "P = [I.Portal('10.96.0.10', 80, 'tcp', '169.254.96.16', 41000, 'a/b:http')]\n"
        "for _ in range(3): r.sync(P)\n"
        "print(I._save(r.binary))\n"
        "r.remove(); print('---'); print(I._save(r.binary))\n")
    out = ns.run(".venv/bin/python", "-c", code).stdout
    before, after = out.split("---")
    assert before.count("-A OUTPUT -j EDGEMESH-OUTPUT") == 1
    assert before.count("-A PREROUTING -j EDGEMESH-PREROUTING") == 1
    assert before.count("--to-destination 169.254.96.16:41000") == 1
    assert "EDGEMESH" not in after


def test_detect_backend_prefers_the_one_with_rules(monkeypatch) -> None:
    counts = {"iptables-legacy": 12, "iptables-nft": 3}
    monkeypatch.setattr(iptables, "_rule_count", lambda b: counts[b])
    assert iptables.detect_backend() == "iptables-legacy"
    counts.update({"iptables-legacy": 0, "iptables-nft": 0})
    assert iptables.detect_backend() == "iptables-nft"
    counts.update({"iptables-legacy": -1, "iptables-nft": -1})
    assert iptables.detect_backend() == "iptables"
