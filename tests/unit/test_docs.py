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


# ---- the repository explains itself: every rule a comment cites is defined in docs/ -----------

RULE_ID = r"\b(D\d+\.\d+|K\d+(?:\.\d+)?)\b"  # D4.3: docs/specs/dns.md; K5.2: docs/specs/watch.md
CASE_LABEL = r"\bD\d+\.\d+/([A-Z]-\d\d)\b"  # a zone-table case's label after its rule: D2.1/H-09
# Where the rules used to live: a reference set beside the clone, which users do not have.
OUTSIDE = ("shared/" + "reference", "/shared" + "/", "shared " + "performance.md",
           "shared " + "netlab.md", "k8s-" + "watch.md", "dns-" + "spec.md")


def _files(*tops: str, ext: str = "") -> list[str]:
    out = []
    for top in tops:
        for dirpath, dirnames, names in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            out += [os.path.join(dirpath, n) for n in names if n.endswith(ext)]
    return sorted(out)


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def _specs() -> str:
    return "\n".join(_read(p) for p in _files("docs/specs", ext=".md"))


def _cited(pattern: str) -> dict[str, str]:
    """Each id the pattern finds in edgemesh/ and tests/ → the first place that cites it."""
    import re
    found: dict[str, str] = {}
    for path in _files("edgemesh", "tests", ext=".py"):
        for n, line in enumerate(_read(path).splitlines(), 1):
            for rule in re.findall(pattern, line):
                found.setdefault(rule, f"{os.path.relpath(path, ROOT)}:{n}")
    return found


def test_every_rule_id_cited_in_code_and_tests_is_defined_in_docs_specs() -> None:
    import re
    specs = _specs()
    cited = _cited(RULE_ID)
    assert {"D4.3", "D11.1", "K3", "K5.2"} <= cited.keys()  # the scan sees the citations
    undefined = {rule: where for rule, where in cited.items()  # a heading or a bold id
                 if not re.search(rf"(^#+ |\*\*){re.escape(rule)}(?!\.?\d)", specs, re.M)}
    assert not undefined, f"define these in docs/specs/ (heading or **bold** id): {undefined}"


def test_every_dns_case_label_is_listed_in_docs_specs() -> None:
    with open(os.path.join(ROOT, "docs", "specs", "dns.md"), encoding="utf-8") as f:
        dns = f.read()
    cited = _cited(CASE_LABEL)
    assert "H-09" in cited
    missing = {label: where for label, where in cited.items() if label not in dns}
    assert not missing, f"list these case labels in docs/specs/dns.md: {missing}"


def test_nothing_refers_to_documents_outside_the_repository() -> None:
    # no exceptions: tests/data holds no path into the reference set either
    hits = [f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}"
            for path in _files("edgemesh", "tests", "bench")
            for n, line in enumerate(_read(path).splitlines(), 1)
            if any(outside in line for outside in OUTSIDE)]
    assert not hits, "point these at docs/ instead:\n" + "\n".join(hits)


def test_docs_that_code_points_to_exist() -> None:
    import re
    cited = {m for path in _files("edgemesh", "tests", "bench", ext=".py")
             for m in re.findall(r"\bdocs/[\w/.-]+\.md\b", _read(path))}
    assert {"docs/specs/dns.md", "docs/specs/watch.md", "docs/performance.md"} <= cited
    cited.discard("docs/guide/edge-gateway.md")  # the Go EdgeMesh's page (test_go_examples.py)
    missing = sorted(p for p in cited if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, missing


def test_links_in_the_specs_and_performance_docs_resolve() -> None:
    import re
    pages = [*_files("docs/specs", ext=".md"), os.path.join(ROOT, "docs", "performance.md")]
    broken = [f"{os.path.relpath(page, ROOT)} → {target}" for page in pages
              for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", _read(page))
              if not os.path.exists(os.path.join(os.path.dirname(page), target))]
    assert not broken, broken
