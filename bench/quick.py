"""Every benchmark briefly (a regression guard, not a measurement): one JSON line each, one table.

Runs each ``bench.<name> --json`` with short runs (seconds, rounds, trials cut down: about five
minutes in all on two cores), keeps the JSON line each prints last, writes them all to
``bench/results/quick.json`` (with the date, commit and load average) and prints the ratio
table that ``bench.table`` also writes into the README. A benchmark that fails or cannot run
here (no network namespaces, no frozen binary) gets a row saying why; the others still run.
``http_probes`` is scored, not timed, and takes over four minutes (probes that wait for a
timeout): it runs only when named (``--only http_probes`` or ``--with-probes``).

    .venv/bin/python -m bench.quick [--only dns,proxy] [--with-probes] [--out FILE]
    make bench-quick
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.table import render_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results", "quick.json")

# name → the short run's arguments (besides --json); None: run only when its input exists
RUNS: dict[str, list[str]] = {
    "dns": ["--seconds", "1", "--rounds", "3", "--casings", "50"],
    "proxy": ["--seconds", "1", "--rounds", "3", "--idle", "500"],
    "http": ["--seconds", "1", "--rounds", "3"],
    "udp": ["--seconds", "1", "--rounds", "2", "--sessions", "0"],
    "gateway": ["--seconds", "1", "--rounds", "3"],
    "tunnel": ["--seconds", "1", "--rounds", "3"],
    "edge_cni": ["--seconds", "1", "--rounds", "3", "--conns", "50"],
    "punch": ["--trials", "3"],
    "scale": ["--sizes", "100,1000", "--sources", "files", "--idle", "1", "--no-iptables",
              "--no-proxy"],
    "binary": ["--runs", "3", "--settle", "1"],
    "http_probes": [],
}
TIMEOUT = 240  # seconds per benchmark
OPT_IN = {"http_probes": "scored, not timed; over 4 min: python -m bench.quick --with-probes"}


def command(name: str) -> list[str]:
    return [sys.executable, "-m", f"bench.{name}", *RUNS[name], "--json"]


def normalise(name: str, line: dict) -> dict:
    """The common shape; edge_cni and http_probes print theirs in their own."""
    if "bench" in line:
        return line
    if name == "edge_cni":
        return {"bench": name, "ratios": {k: v for k, v in line.items() if k.endswith("_ratio")
                                          or k == "pod_vs_raw_throughput"},
                "medians": {f"{k} {p}": v for k in ("gbps", "connect_us")
                            for p, v in line.get(k, {}).items()},
                "peers": {"ClusterIP": "the same Pod through its Service"}}
    if name == "http_probes":
        scores = line.get("scores", {})
        return {"bench": name, "ratios": {}, "peers": line.get("versions", {}),
                "medians": {f"{t} safe of {s['total']}": s["safe"] for t, s in scores.items()}}
    return {"bench": name, "ratios": {}, "medians": {}, "peers": {}, "raw": line}


def run(name: str) -> dict:
    started = time.monotonic()
    if name == "binary" and not os.path.exists(os.path.join(ROOT, "dist", "edgemesh")):
        return {"bench": name, "skipped": "no dist/edgemesh (make binary onedir builds it)"}
    try:
        proc = subprocess.run(command(name), cwd=ROOT, capture_output=True, text=True,
                              timeout=TIMEOUT, env={**os.environ, "PYTHONPATH": ROOT})
    except subprocess.TimeoutExpired:
        return {"bench": name, "skipped": f"timed out after {TIMEOUT} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    for text in reversed(lines):
        try:
            got = normalise(name, json.loads(text))
        except ValueError:
            continue
        got["seconds"] = round(time.monotonic() - started, 1)
        got["command"] = " ".join(["python", "-m", f"bench.{name}", *RUNS[name]])
        return got
    said = (proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines() or [""])[-1]
    return {"bench": name, "skipped": f"exit {proc.returncode}: {said[:200]}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--with-probes", action="store_true", help="http_probes too")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(RUNS)
    skip = {} if args.only or args.with_probes else OPT_IN
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    results = []
    load_before = os.getloadavg()[0]
    for name in names:
        if name in skip:
            results.append({"bench": name, "skipped": skip[name]})
            continue
        print(f"bench.{name} ...", file=sys.stderr, flush=True)
        results.append(run(name))
        print(f"  {results[-1].get('seconds', '-')} s", file=sys.stderr, flush=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
              "cpus": os.cpu_count(), "load": [round(load_before, 1),
                                               round(os.getloadavg()[0], 1)],
              "results": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    print(render_text(report))
    print(f"\nwritten: {os.path.relpath(args.out)}; the README's table: "
          "python -m bench.table --write")
    return 0


if __name__ == "__main__":
    sys.exit(main())
