"""bench.table: the README's benchmark table comes from bench.quick's JSON, between markers."""
from __future__ import annotations

from pathlib import Path

from bench import table
from bench.quick import normalise

REPORT = {"date": "2026-12-06 17:00 UTC", "commit": "abc1234", "cpus": 2, "load": [12.0, 13.1],
          "results": [{"bench": "dns", "ratios": {"cluster qps edgemesh/dnsmasq": 1.234},
                       "medians": {}, "peers": {"dnsmasq": "--cache-size=10000"}},
                      {"bench": "binary", "skipped": "no dist/edgemesh"},
                      {"bench": "http_probes", "ratios": {}, "peers": {},
                       "medians": {"nginx safe of 197": 190}}]}


def test_the_table_replaces_only_what_is_between_the_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"prose before\n{table.BEGIN}\nold | table\n{table.END}\nprose after\n")
    table.write_readme(table.render_markdown(REPORT), str(readme))
    text = readme.read_text()
    assert text.startswith("prose before\n") and text.endswith("prose after\n")
    assert "old | table" not in text
    assert "| `bench.dns` | cluster qps edgemesh/dnsmasq 1.23 | dnsmasq: --cache-size=10000 |" \
        in text
    assert "not run: no dist/edgemesh" in text and "nginx safe of 197 190" in text
    assert "load average 12.0–13.1" in text


def test_the_readme_has_the_markers() -> None:
    text = Path(table.README).read_text(encoding="utf-8")
    assert text.count(table.BEGIN) == 1 and text.count(table.END) == 1


def test_the_lines_edge_cni_and_http_probes_print_are_normalised() -> None:
    cni = normalise("edge_cni", {"throughput_ratio": 1.0, "connect_ratio": 1.1,
                                 "gbps": {"pod": 2.0}, "rounds": 3})
    assert cni["ratios"] == {"throughput_ratio": 1.0, "connect_ratio": 1.1}
    assert cni["medians"] == {"gbps pod": 2.0}
    probes = normalise("http_probes", {"scores": {"nginx": {"safe": 3, "total": 4}}})
    assert probes["medians"] == {"nginx safe of 4": 3}
