"""Docs generated from code must match the code."""
from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_configuration_reference_is_current() -> None:
    spec = importlib.util.spec_from_file_location(
        "gen", os.path.join(ROOT, "docs", "gen_config_reference.py"))
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    with open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8") as f:
        on_disk = f.read()
    assert on_disk == gen.render(), "run: python docs/gen_config_reference.py"


MIGRATION = os.path.join(ROOT, "docs", "migration-from-go.md")


def _migration() -> str:
    with open(MIGRATION, encoding="utf-8") as f:
        return f.read()


def test_migration_guide_links_and_paths_exist() -> None:
    import re
    text = _migration()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert os.path.exists(os.path.join(ROOT, "docs", target)), target
    ours = {p for p in re.findall(r"`(build/[\w./-]+)`", text)
            if not p.startswith("build/helm/")}  # the Go project's charts
    assert "build/kustomization.yaml" in ours
    for path in ours - {"build/psk"}:  # build/psk is what generate-psk.sh writes
        assert os.path.exists(os.path.join(ROOT, path)), path


def test_migration_guide_examples_are_what_the_code_does() -> None:
    import yaml

    from edgemesh import config as cfg
    from edgemesh.tunnel.links import relay_plan
    text = _migration()
    [relays] = [b for b in text.split("```yaml\n")[1:] if "relayNodes" in b]
    c = cfg.from_mapping(yaml.safe_load(relays.split("```")[0]))
    tunnel = c.modules.edgeTunnel
    assert relay_plan(tunnel, "k8s-master") == (True, [], ["1.1.1.1"])
    assert relay_plan(tunnel, "edge-1") == (False, ["1.1.1.1:20006"], [])
    warnings: list[str] = []
    cfg.from_mapping({"modules": {"edgeTunnel": {"transport": "tcp"}}}, warnings)
    assert f"warning: {warnings[0]}\n" in text
