"""HTTP attack probes against edgemesh gateway, nginx and haproxy with the same routes, scored.

Runs the catalogue of ``tests/http_probes.py`` (request smuggling CL.TE/TE.CL/TE.TE, h2c
upgrades, Expect early-answer bleed, path normalisation and deny bypasses, absolute-form and
Host confusion, versions and target forms, chunk syntax, header syntax, ReDoS heads, size
limits) in one run against each front end on loopback, each with its own recording backend
(``tests/recording_backend.py``), and prints a table of SAFE/UNSAFE per probe and tool, the
scores side by side, each peer's version and configuration, and the reasons for every UNSAFE.

    .venv/bin/python -m bench.http_probes [--json] [--only SUBSTRING ...] [--tools a,b]
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402

from tests.http_probes import PROBES, Probe  # noqa: E402
from tests.probe_fronts import STARTERS, available  # noqa: E402
from tests.probe_runner import Verdict, run_all  # noqa: E402

TOOLS = ("edgemesh-gateway", "nginx", "haproxy")


def run_tool(name: str, probes: list[Probe], tmp: str) -> tuple[dict[str, Verdict], str, str]:
    """Verdicts by probe name, the tool's version line and its configuration."""
    running = STARTERS[name](tmp)
    try:
        return ({v.probe: v for v in run_all(probes, running.front)}, running.version,
                running.config)
    finally:
        running.stop()


def table(probes: list[Probe], results: dict[str, dict[str, Verdict]]) -> list[str]:
    """One line per probe: its class and SAFE/UNSAFE per tool (``-`` where it does not apply)."""
    tools = list(results)
    width = max(len(p.name) for p in probes)
    lines = [f"{'probe':<{width}}  {'class':<18} " + " ".join(f"{t[:16]:>16}" for t in tools)]
    for p in probes:
        cells = []
        for t in tools:
            v = results[t].get(p.name)
            cells.append(f"{'-' if v is None else 'SAFE' if v.safe else 'UNSAFE':>16}")
        lines.append(f"{p.name:<{width}}  {p.kind.value:<18} " + " ".join(cells))
    return lines


def scores(results: dict[str, dict[str, Verdict]]) -> dict[str, tuple[int, int]]:
    return {t: (sum(v.safe for v in r.values()), len(r)) for t, r in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    parser.add_argument("--only", nargs="*", default=[], help="probes whose name contains any")
    parser.add_argument("--verbose", action="store_true",
                        help="also print why each SAFE probe was judged safe")
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help=f"comma-separated, from {', '.join(STARTERS)}")
    args = parser.parse_args()
    probes = [p for p in PROBES if not args.only or any(o in p.name for o in args.only)]
    results: dict[str, dict[str, Verdict]] = {}
    about: dict[str, tuple[str, str]] = {}
    for tool in args.tools.split(","):
        if not available(tool):
            print(f"{tool}: not installed, skipped (make setup installs nginx-light, haproxy)")
            continue
        with tempfile.TemporaryDirectory(prefix=f"em-probes-{tool}-") as tmp:
            results[tool], version, config = run_tool(tool, probes, tmp)
        about[tool] = (version, config)
    print("\n".join(table(probes, results)))
    print()
    for tool, (version, config) in about.items():
        print(f"== {tool}: {version}\n{config.strip()}\n")
    for tool, verdicts in results.items():
        if args.verbose:
            print(f"== {tool}: SAFE because")
            for v in verdicts.values():
                if v.safe:
                    print(f"  {v.probe}: {v.reason}")
        unsafe = [v for v in verdicts.values() if not v.safe]
        print(f"== {tool}: {len(unsafe)} UNSAFE")
        for v in unsafe:
            print(f"  {v.probe}: {v.reason}")
    print()
    got = scores(results)
    print("  ".join(f"{t} {s}/{n}" for t, (s, n) in got.items()))
    if args.json:
        print(json.dumps({"scores": {t: {"safe": s, "total": n} for t, (s, n) in got.items()},
                          "versions": {t: v for t, (v, _) in about.items()},
                          "unsafe": {t: sorted(p for p, v in r.items() if not v.safe)
                                     for t, r in results.items()}}))


if __name__ == "__main__":
    main()
