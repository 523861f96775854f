"""Manifest and config bombs: a billion-laughs YAML (nine lines of anchors standing for ~400
million nodes), a deeply nested document and a self-referencing one are refused quickly, by
the files source and by ``edgemesh config validate``, and the files source keeps serving."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from edgemesh import doc_limits
from edgemesh.meta.store import Store
from tests.unit.test_files_source import bad_count, loaded, service

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def laughs(key: str = "bomb") -> str:
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + f"\n{key}: *l8\n"


BOMBS = {
    "laughs": laughs(),
    "deep": "bomb: " + "[" * 20000 + "]" * 20000 + "\n",
    "nested": "bomb: " + "{a: " * 200 + "1" + "}" * 200 + "\n",
    "cycle": "bomb: &c [*c]\n",
}


@pytest.mark.parametrize("name", BOMBS)
def test_the_files_source_refuses_bombs_and_keeps_serving(tmp_path, name: str) -> None:
    (tmp_path / "good.yaml").write_text(service("web"))
    (tmp_path / "bomb.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: demo}\n"
        + BOMBS[name])
    before = bad_count()
    started = time.process_time()
    store, source = loaded(tmp_path)
    assert time.process_time() - started < 2.0  # a walk of the expansion would take minutes
    assert store.service("demo", "web") is not None
    assert bad_count() == before + 1
    problem = " ".join(source.errors[str(tmp_path / "bomb.yaml")])
    assert "nested" in problem or "expands" in problem


@pytest.mark.parametrize("name", ["laughs", "deep", "cycle"])
def test_config_validate_refuses_bombs(tmp_path, name: str) -> None:
    path = tmp_path / "config.yaml"
    text = BOMBS[name].replace("bomb:", "modules:\n  edgeTunnel:\n    servers:") \
        if name == "laughs" else BOMBS[name]
    path.write_text(text)
    out = subprocess.run([sys.executable, "-m", "edgemesh", "config", "validate", str(path)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-500:]
    assert "nested" in out.stderr or "expands" in out.stderr, out.stderr[-500:]
    assert "Traceback" not in out.stderr


def test_bounds_count_what_a_walk_would_see() -> None:
    shared = ["x"] * 10
    assert doc_limits.problem({"a": [shared] * 10}, 0) == ""
    assert "expands" in doc_limits.problem([[shared] * 1000] * 1000, 0)
    assert "nested" in doc_limits.problem(
        {"a": {"b": {"c": 1}}}, 0, max_depth=2)
    assert doc_limits.problem(Store, 0) == ""  # scalars of any type are leaves


def test_a_deep_json_manifest_is_refused_without_a_walk(tmp_path) -> None:
    """JSON is not walked (no aliases: it cannot expand); the decoder's depth bound refuses."""
    (tmp_path / "good.yaml").write_text(service("web"))
    (tmp_path / "bomb.json").write_text(
        '{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": '
        + "[" * 20000 + "]" * 20000 + "}")
    before = bad_count()
    store, source = loaded(tmp_path)
    assert store.service("demo", "web") is not None
    assert bad_count() == before + 1
    assert "nested too deeply" in " ".join(source.errors[str(tmp_path / "bomb.json")])
