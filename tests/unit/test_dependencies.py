"""Every runtime dependency is declared and used; what only tests use sits in the test extra.

Imports are read from the source (every ``import``, function-level ones included), so a
package imported lazily (cryptography at the first handshake) counts as used."""
from __future__ import annotations

import ast
import configparser
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMPORT_NAMES = {"PyYAML": "yaml", "pyOpenSSL": "OpenSSL"}  # distribution → top-level module


def _declared(key: str, section: str = "options") -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    names = (line.split("#")[0].strip() for line in cfg[section][key].splitlines())
    return {IMPORT_NAMES.get(n, n) for n in names if n}


def _third_party_imports(folder: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "edgemesh"}


def test_runtime_dependencies_are_exactly_what_edgemesh_imports() -> None:
    assert _third_party_imports("edgemesh") == _declared("install_requires")


def test_test_only_packages_stay_out_of_edgemesh() -> None:
    test_only = _declared("test", "options.extras_require")
    assert {"h11", "wsproto"} <= test_only
    assert not test_only & _third_party_imports("edgemesh")
