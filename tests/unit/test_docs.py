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
