"""Frozen binary: size, `version` start time and idle agent RSS, against issue 9's targets.

Builds ``dist/edgemesh`` (onefile) and ``dist/edgemesh-onedir/`` when missing (``--rebuild``
forces both). Start time is the median of ``--runs`` runs of ``edgemesh version`` (hyperfine
when installed), printed next to the same command from the source tree and a bare
``python -c pass`` measured in the same run, so a noisy machine shows in every row alike.
Idle RSS: an agent with DNS, proxy (no iptables) and tunnel on loopback, the examples loaded,
measured after /readyz and a settle; for onefile the unpacking parent process is added. A last
row runs the onefile agent with a session to an ``edgemesh server`` on loopback: the tunnel's
cryptography is loaded then (the first handshake imports it).

    .venv/bin/python -m bench.binary [--runs 21] [--rebuild] [--settle 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench.report import add_json_flag, emit
from tests.procs import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONEFILE = os.path.join(ROOT, "dist", "edgemesh")
ONEDIR = os.path.join(ROOT, "dist", "edgemesh-onedir")
SOURCE = [sys.executable, "-m", "edgemesh"]
TARGETS = {"onefile size MB": 20.0, "onedir start s": 0.3, "onefile start s": 0.6,
           "idle agent RSS MB": 35.0}
NAIVE = {"onefile size MB": 37.0, "onefile start s": 0.9, "idle agent RSS MB": 60.0}


def build(rebuild: bool) -> None:
    for target, path in (("binary", ONEFILE), ("onedir", ONEDIR)):
        if rebuild or not os.path.exists(path):
            print(f"make {target} ...", flush=True)
            subprocess.run(["make", "-s", target], cwd=ROOT, check=True)


def tree_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def start_time(argv: list[str], runs: int) -> float:
    """Median wall time of ``argv`` in seconds (one warm-up run first)."""
    if shutil.which("hyperfine"):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run(["hyperfine", "-N", "-w", "1", "-r", str(runs), "--export-json",
                            out.name, " ".join(argv)], check=True, capture_output=True)
            return float(json.load(open(out.name))["results"][0]["median"])
    subprocess.run(argv, check=True, capture_output=True)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (all resident pages) or RssAnon (heap and stacks only) of ``pid`` in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def agent_config(tmp: str) -> str:
    psk = os.path.join(tmp, "psk")
    with open(psk, "w", encoding="ascii") as f:
        f.write(secrets.token_urlsafe(32))
    os.chmod(psk, 0o600)
    config = os.path.join(tmp, "agent.yaml")
    with open(config, "w", encoding="utf-8") as f:
        f.write(f"""modules:
  edgeDNS:
    listenAddress: 127.0.0.1
    listenPort: {free_port()}
    cacheDNS: {{upstreamServers: [127.0.0.1:{free_port()}]}}
  edgeProxy: {{iptables: false, listenAddress: 127.0.0.1}}
  edgeTunnel:
    listenAddress: 127.0.0.1
    listenPort: {free_port()}
    psk: {{path: {psk}}}
""")
    return config


def idle_rss(argv: list[str], settle: float, relay: bool = False) -> tuple[float, str]:
    """RSS in MB of an idle agent (all processes of it), and what was running. ``relay``: the
    agent also holds a tunnel session to an ``edgemesh server`` on loopback (as every agent
    with a server configured does), so the tunnel's cryptography is loaded."""
    with tempfile.TemporaryDirectory(prefix="edgemesh-bench-") as tmp:
        admin = f"127.0.0.1:{free_port()}"
        config = agent_config(tmp)
        cmd = [*argv, "agent", "--config", config, "--no-iptables",
               "--manifests", os.path.join(ROOT, "examples"), "--admin", admin,
               "--state-dir", os.path.join(tmp, "state"), "--node-name", "edge-node-1"]
        server = None
        if relay:
            port = free_port()
            server = subprocess.Popen(
                [*argv, "server", "--listen", f"127.0.0.1:{port}", "--psk-file",
                 os.path.join(tmp, "psk"), "--state-dir", os.path.join(tmp, "srv"),
                 "--admin", f"127.0.0.1:{free_port()}", "--node-name", "relay"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
            cmd += ["--server", f"127.0.0.1:{port}"]
        log = open(os.path.join(tmp, "log"), "w+b")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + 30
            while not ready(admin):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"agent did not get ready:\n{log.read().decode()}")
                time.sleep(0.1)
            time.sleep(settle)
            pids = [proc.pid, *children(proc.pid)]
            total = sum(rss_kb(p) for p in pids)
            anon = sum(rss_kb(p, "RssAnon") for p in pids)
            with urllib.request.urlopen(f"http://{admin}/debug/node", timeout=3) as r:
                node = json.load(r)
            with urllib.request.urlopen(f"http://{admin}/debug/runtime", timeout=3) as r:
                runtime = json.load(r)
            log.seek(0)
            started = re.findall(r"module (\S+) started", log.read().decode(errors="replace"))
            parent = (f"; onefile parent {rss_kb(proc.pid) / 1024:.1f} MB"
                      if len(pids) > 1 else "")
            return total / 1024, (f"(anonymous {anon / 1024:.1f} MB; the rest is mapped "
                                  f"libraries{parent}) {runtime['modules_loaded']} Python "
                                  f"modules, synced={node.get('synced')} "
                                  f"modules={','.join(started)}")
        finally:
            for p in (proc, server):
                if p is not None:
                    p.terminate()
                    p.wait(timeout=15)


def ready(admin: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{admin}/readyz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


ROWS: dict[str, float] = {}  # every row's figure, for the --json line


def row(name: str, value: float, unit: str, peer: str = "") -> None:
    ROWS[f"{name} {unit}"] = value
    target = TARGETS.get(f"{name} {unit}")
    verdict = ""
    if target is not None:
        verdict = f"target {target:g} {unit}: {'ok' if value <= target else 'OVER'}"
        naive = NAIVE.get(f"{name} {unit}")
        if naive:
            verdict += f"  (naive build {naive:g}, ×{value / naive:.2f})"
    print(f"{name:22} {value:8.3f} {unit:3} {verdict} {peer}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--settle", type=float, default=3.0)
    add_json_flag(ap)
    args = ap.parse_args()
    build(args.rebuild)
    onedir_exe = os.path.join(ONEDIR, "edgemesh")
    row("onefile size", tree_size(ONEFILE) / 1e6, "MB")
    row("onedir size", tree_size(ONEDIR) / 1e6, "MB")
    bare = start_time([sys.executable, "-c", "pass"], args.runs)
    source = start_time([*SOURCE, "version"], args.runs)
    for name, argv in (("onedir", [onedir_exe]), ("onefile", [ONEFILE])):
        t = start_time([*argv, "version"], args.runs)
        row(f"{name} start", t, "s", f"| source tree {source:.3f} s (×{t / source:.2f}), "
                                     f"python -c pass {bare:.3f} s")
    for name, argv in (("onedir", [onedir_exe]), ("onefile", [ONEFILE]), ("source", SOURCE)):
        mb, info = idle_rss(argv, args.settle)
        row("idle agent RSS" if name == "onefile" else f"idle RSS {name}", mb, "MB", info)
    # not the target's setting (no peers), but what an agent with a relay server looks like
    mb, info = idle_rss([ONEFILE], args.settle, relay=True)
    row("idle, relay session", mb, "MB", f"onefile {info}")
    if args.json:
        ROWS["source start s"], ROWS["python -c pass s"] = source, bare
        emit("binary", {"onefile start/source": ROWS["onefile start s"] / source,
                        "onedir start/source": ROWS["onedir start s"] / source,
                        "idle RSS onefile/source": ROWS["idle agent RSS MB"]
                        / ROWS["idle RSS source MB"]},
             ROWS, {"source": "the same agent from the source tree; python -c pass"})


if __name__ == "__main__":
    main()
