"""The atheris targets in CI: every committed corpus input replayed through its target, then
each target fuzzed for a short random budget (``make fuzz`` runs a million inputs each).

A crash or a hang fails the test with libFuzzer's log (the input is in ``.fuzz/artifacts/``);
the committed corpus is read only here (new inputs go to a temporary directory).
"""
from __future__ import annotations

import os

import pytest

from tests.fuzz import run
from tests.fuzz.targets import TARGETS

BUDGET_SECONDS = 2  # per target, two targets at a time: ~20 s for all of them


def corpus(name: str) -> list[str]:
    d = os.path.join(run.CORPUS, name)
    return sorted(os.path.join(d, f) for f in os.listdir(d))


@pytest.mark.parametrize("name", list(TARGETS))
def test_corpus_replays_without_an_undocumented_error(name: str) -> None:
    inputs = corpus(name)
    assert inputs, f"no corpus for {name}"
    for path in inputs:
        with open(path, "rb") as f:
            data = f.read()
        try:
            TARGETS[name](data)
        except Exception as e:
            raise AssertionError(f"{name} on {path}: {type(e).__name__}: {e}") from e


def test_every_target_survives_a_short_random_budget(tmp_path) -> None:
    pytest.importorskip("atheris")
    from concurrent.futures import ThreadPoolExecutor

    def fuzz(name: str) -> run.Outcome:
        work = tmp_path / name
        work.mkdir()
        return run.run_target(name, 0, BUDGET_SECONDS, 10, log=str(tmp_path / f"{name}.log"),
                              corpus_dirs=[str(work), os.path.join(run.CORPUS, name)])
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(fuzz, TARGETS))
    print("\n" + run.table(outcomes))
    for o in outcomes:
        assert o.ok, f"{o.target}: crashes {o.crashes}, hangs {o.hangs}, inputs {o.inputs}\n" \
                     + "\n".join(o.log.splitlines()[-40:])
        assert o.inputs > len(corpus(o.target)), f"{o.target} ran only its corpus"
