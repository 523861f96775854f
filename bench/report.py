"""What every benchmark prints besides its table: the peers' configuration and, with ``--json``,
one machine-readable line that ``bench.quick`` collects and ``bench.table`` turns into the
README's table.

    {"bench": "proxy", "ratios": {...}, "medians": {...}, "peers": {...}}

``ratios``: medians of per-round ratios, named ``ours/peer`` (> 1: ours is better, unless the
name says otherwise); ``medians``: the per-path medians they come from; ``peers``: each peer's
configuration lines that matter.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterable


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="also print one JSON line (ratios, medians, peers) at the end")


def config_lines(text: str, keep: Iterable[str]) -> str:
    """The lines of a peer's config that start with one of ``keep`` (stripped, joined by '; ')."""
    wanted = tuple(keep)
    return "; ".join(line.strip().rstrip(";") for line in text.splitlines()
                     if line.strip().startswith(wanted))


def print_peers(peers: dict[str, str]) -> None:
    print("peers as configured:")
    for name, conf in peers.items():
        print(f"  {name}: {conf}")


def median_ratio(ours: Iterable[float], theirs: Iterable[float]) -> float:
    """The median of per-round ratios (0.0 where the peer measured 0)."""
    return statistics.median(a / b if b else 0.0 for a, b in zip(ours, theirs, strict=True))


def emit(bench: str, ratios: dict[str, float], medians: dict[str, float] | None = None,
         peers: dict[str, str] | None = None, **extra: object) -> None:
    """Print the one JSON line (floats rounded to 4 significant digits)."""
    def tidy(d: dict[str, float] | None) -> dict[str, float]:
        return {k: float(f"{v:.4g}") for k, v in (d or {}).items()}
    print(json.dumps({"bench": bench, "ratios": tidy(ratios), "medians": tidy(medians),
                      "peers": peers or {}, **extra}, sort_keys=True), flush=True)
