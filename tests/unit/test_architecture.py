"""The shape of edgemesh/, checked: no import cycle (top-level, function-level and
TYPE_CHECKING imports all count), no module importing upward, and sans-IO cores that import
no I/O.

Layers, lowest first (a module may import its own layer or lower ones, never higher):

====  ===============================================================================
rank  modules
====  ===============================================================================
0     ``edgemesh`` (version), ``errors``, ``doc_limits``, ``netlink``
1     ``runtime.{logs,metrics,tasks,backoff,patching,heap}``
2     ``config_go``, ``config``
3     ``netdev``, ``runtime.admin``
4     ``meta.*`` (models, the store, sources)
5     ``dialer`` (THE way to reach an endpoint)
6     ``proxy.*`` and ``dns.*`` (cores and shells)
7     ``tunnel.*`` and ``gateway.*`` (both build on the proxy's pumps and HTTP engine)
8     ``context`` (the typed wiring), ``runtime.lifecycle``
9     each package's ``module`` (the glue a node assembles)
10    ``agent``, ``server.*``, ``cleanup``, ``status``
11    ``cli``, ``__main__``
====  ===============================================================================
"""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PKG = ROOT / "edgemesh"

RANKS: list[tuple[int, tuple[str, ...]]] = [
    (11, ("edgemesh.cli", "edgemesh.__main__")),
    (10, ("edgemesh.agent", "edgemesh.server", "edgemesh.cleanup", "edgemesh.status")),
    (9, ("edgemesh.proxy.module", "edgemesh.dns.module", "edgemesh.tunnel.module",
         "edgemesh.gateway.module")),
    (8, ("edgemesh.context", "edgemesh.runtime.lifecycle")),
    (7, ("edgemesh.tunnel", "edgemesh.gateway")),
    (6, ("edgemesh.proxy", "edgemesh.dns")),
    (5, ("edgemesh.dialer",)),
    (4, ("edgemesh.meta",)),
    (3, ("edgemesh.netdev", "edgemesh.runtime.admin")),
    (2, ("edgemesh.config_go", "edgemesh.config")),
    (1, ("edgemesh.runtime",)),
    (0, ("edgemesh.errors", "edgemesh.doc_limits", "edgemesh.netlink", "edgemesh")),
]

# sans-IO cores: no sockets, no greenlets, no subprocesses, no HTTP client
CORES = ["edgemesh.dns.wire", "edgemesh.dns.zone", "edgemesh.dns.cache", "edgemesh.dns.answers",
         "edgemesh.tunnel.frames", "edgemesh.tunnel.records", "edgemesh.tunnel.control",
         "edgemesh.tunnel.punch", "edgemesh.proxy.lb", "edgemesh.proxy.http_head",
         "edgemesh.proxy.http_body", "edgemesh.proxy.http_target", "edgemesh.proxy.http_exchange",
         "edgemesh.proxy.tls_sni", "edgemesh.proxy.meshcidr", "edgemesh.proxy.podmap",
         "edgemesh.gateway.routes", "edgemesh.gateway.compile", "edgemesh.gateway.linear_re",
         "edgemesh.meta.models", "edgemesh.meta.kubewire", "edgemesh.meta.istio",
         "edgemesh.meta.watch"]
IO = {"socket", "_socket", "gevent", "requests", "subprocess", "select", "selectors"}


def rank(module: str) -> int:
    for r, prefixes in RANKS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return r
    raise AssertionError(f"{module} has no layer: add it to RANKS")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level
                                       + (path.name == "__init__.py")]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_no_module_imports_upward() -> None:
    upward = sorted(f"{a} ({rank(a)}) imports {b} ({rank(b)})"
                    for a, targets in _graph().items() for b in targets
                    if rank(b) > rank(a) and not b == "edgemesh")
    assert upward == []


def test_the_layers_name_every_module() -> None:
    for name in _modules():
        rank(name)


@pytest.mark.parametrize("core", CORES)
def test_sans_io_cores_import_no_io(core: str) -> None:
    code = (f"import sys; import {core}; "
            f"print(sorted(set(sys.modules) & set({sorted(IO)!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]", f"{core} pulls in {out}"
