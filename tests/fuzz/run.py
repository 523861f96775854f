"""Run the atheris fuzz targets of ``tests/fuzz/targets.py`` and print one table.

    python -m tests.fuzz.run [--runs N] [--jobs J] [--timeout S] [--seconds T] [TARGET...]
    python -m tests.fuzz.run --merge [TARGET...]     # minimise new finds into the corpus

Each target runs in its own process (libFuzzer owns the process and exits), ``J`` at a time,
over ``tests/fuzz/corpus/TARGET`` (read only: new inputs go to ``.fuzz/TARGET``), for ``N``
inputs (``-runs``) or ``T`` seconds. A crash or a hang (one input over ``S`` seconds,
libFuzzer's ``-timeout``) leaves its input in ``.fuzz/artifacts/`` and is counted; the exit
status is 1 if any target crashed or hung. Coverage is libFuzzer's last ``cov:`` (edges of the
instrumented ``edgemesh`` modules) and ``ft:`` (features) figures.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CORPUS = os.path.join(HERE, "corpus")
WORK = os.path.join(ROOT, ".fuzz")
MAX_LEN = 4096
# the config target parses YAML in pure Python (~1 ms per KB): 1 KB inputs keep a million
# inputs within half an hour on one core and still hold several sections of keys
MAX_LEN_OF = {"config": 1024}
CORPUS_BYTES = 40_000  # the committed corpus of one target, at most
SLOW_FIRST = ("config", "manifests", "tunnel_handshake")


@dataclass
class Outcome:
    target: str
    inputs: int = 0
    cov: int = 0
    ft: int = 0
    crashes: int = 0
    hangs: int = 0
    seconds: float = 0.0
    log: str = ""

    @property
    def state(self) -> str:
        """How the run ended: done (its -runs or time), stopped (SIGINT), or running."""
        if "run interrupted" in self.log:
            return "stopped"
        return "done" if re.search(r"^Done \d+ runs|^stat::number_of", self.log, re.M) \
            else "running"

    @property
    def ok(self) -> bool:
        return self.crashes == 0 and self.hangs == 0 and self.inputs > 0


def _command(name: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """The script as a program (libFuzzer's -merge re-runs argv[0]), on this Python."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return ([os.path.join(HERE, "atheris_main.py"), *args],
            {**os.environ, "EDGEMESH_FUZZ_TARGET": name, "PATH": path})


def run_target(name: str, runs: int, seconds: int, timeout: int,
               corpus_dirs: list[str] | None = None, log: str | None = None) -> Outcome:
    """One target under atheris in a subprocess; its figures parsed from libFuzzer's log."""
    work = os.path.join(WORK, name)
    artifacts = os.path.join(WORK, "artifacts", name) + "-"
    os.makedirs(work, exist_ok=True)
    os.makedirs(os.path.dirname(artifacts), exist_ok=True)
    dirs = corpus_dirs if corpus_dirs is not None else [work, os.path.join(CORPUS, name)]
    args = [f"-timeout={timeout}", f"-max_len={MAX_LEN_OF.get(name, MAX_LEN)}",
            f"-artifact_prefix={artifacts}", "-print_final_stats=1", "-rss_limit_mb=2048", *dirs]
    args.insert(0, f"-runs={runs}" if runs else "-runs=-1")
    if seconds:
        args.insert(0, f"-max_total_time={seconds}")
    log_path = log or os.path.join(WORK, name + ".log")
    start = time.monotonic()
    with open(log_path, "w") as f:
        f.write(f"# started {time.time():.3f}\n")
        f.flush()
        argv, env = _command(name, *args)
        subprocess.run(argv, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    return read_log(name, log_path, time.monotonic() - start)


def read_log(name: str, path: str, seconds: float | None = None) -> Outcome:
    """A target's figures from its log, also while it runs or after it was stopped."""
    with open(path, errors="replace") as f:
        log = f.read()
    if seconds is None:
        seconds = os.stat(path).st_mtime - os.stat(path).st_ctime
        started = re.search(r"^# started (\d+\.\d+)", log, re.M)
        if started:
            seconds = os.stat(path).st_mtime - float(started.group(1))
    return parse_log(name, log, seconds)


STAT = re.compile(r"^#(\d+)\s+\S+\s+cov: (\d+) ft: (\d+)", re.M)
DONE = re.compile(r"^Done (\d+) runs in", re.M)
RUNS = re.compile(r"^stat::number_of_executed_units: (\d+)", re.M)


def parse_log(name: str, log: str, seconds: float) -> Outcome:
    out = Outcome(name, seconds=seconds, log=log)
    stats = STAT.findall(log)
    if stats:
        out.inputs, out.cov, out.ft = (int(x) for x in stats[-1])
    for pattern in (RUNS, DONE):
        found = pattern.findall(log)
        if found:
            out.inputs = max(out.inputs, int(found[-1]))
    if "ALARM: working on the last Unit" in log or "libFuzzer: timeout" in log:
        out.hangs = 1
    elif "Uncaught Python exception" in log or "ERROR: libFuzzer" in log:
        out.crashes = 1
    return out


def merge(name: str) -> None:
    """Minimise the committed corpus plus the new finds in ``.fuzz/NAME`` into the corpus."""
    fresh = os.path.join(WORK, name + ".merged")
    shutil.rmtree(fresh, ignore_errors=True)
    os.makedirs(fresh)
    committed = os.path.join(CORPUS, name)
    argv, env = _command(name, "-merge=1", f"-max_len={MAX_LEN_OF.get(name, MAX_LEN)}", fresh,
                         committed, os.path.join(WORK, name))
    subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, check=True)
    if not os.listdir(fresh):
        raise RuntimeError(f"merging {name} gave an empty corpus")
    _trim(fresh, CORPUS_BYTES)
    shutil.rmtree(committed)
    shutil.move(fresh, committed)


def _trim(directory: str, budget: int) -> None:
    """Keep the smallest inputs of ``directory`` that fit in ``budget`` bytes (seeds first)."""
    files = sorted(os.listdir(directory),
                   key=lambda n: (not n.startswith("seed-"),
                                  os.path.getsize(os.path.join(directory, n))))
    used = 0
    for name in files:
        used += os.path.getsize(os.path.join(directory, name))
        if used > budget:
            os.unlink(os.path.join(directory, name))


def table(outcomes: list[Outcome]) -> str:
    rows = [("target", "inputs", "cov", "ft", "crashes", "hangs", "wall s", "")]
    rows += [(o.target, f"{o.inputs:,}", str(o.cov), str(o.ft), str(o.crashes), str(o.hangs),
              f"{o.seconds:.0f}", o.state) for o in outcomes]
    rows.append(("total", f"{sum(o.inputs for o in outcomes):,}", "", "",
                 str(sum(o.crashes for o in outcomes)), str(sum(o.hangs for o in outcomes)),
                 f"{sum(o.seconds for o in outcomes):.0f}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in rows)


def main(argv: list[str]) -> int:
    from tests.fuzz.targets import TARGETS
    p = argparse.ArgumentParser(prog="python -m tests.fuzz.run")
    p.add_argument("targets", nargs="*", help="default: all of them")
    p.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    p.add_argument("--seconds", type=int, default=0, help="or a time budget per target")
    p.add_argument("--jobs", type=int, default=2, help="targets fuzzed at once")
    p.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    p.add_argument("--merge", action="store_true", help="minimise new finds into the corpus")
    p.add_argument("--report", action="store_true",
                   help="only print the table from the logs in .fuzz/ (also of a running fuzz)")
    a = p.parse_args(argv)
    names = a.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        p.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    names.sort(key=lambda n: n not in SLOW_FIRST)  # the longest runs start first
    if a.report:
        print(table([read_log(n, os.path.join(WORK, n + ".log")) for n in names
                     if os.path.exists(os.path.join(WORK, n + ".log"))]))
        return 0
    if a.merge:
        for name in names:
            merge(name)
        return 0
    def one(name: str) -> Outcome:
        o = run_target(name, a.runs, a.seconds, a.timeout)
        print(f"{o.target}: {o.inputs:,} inputs, cov {o.cov}, ft {o.ft}, crashes {o.crashes}, "
              f"hangs {o.hangs}, {o.seconds:.0f} s", flush=True)
        return o
    with ThreadPoolExecutor(a.jobs) as pool:
        outcomes = list(pool.map(one, names))
    for o in outcomes:
        if not o.ok:
            tail = "\n".join(o.log.splitlines()[-40:])
            print(f"---- {o.target}: crashed, hung or did not run ----\n{tail}\n")
    print(table(outcomes))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
