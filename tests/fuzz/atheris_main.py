#!/usr/bin/env python3
"""One atheris target in this process: ``EDGEMESH_FUZZ_TARGET=NAME python
tests/fuzz/atheris_main.py LIBFUZZER-ARGS...`` (what ``tests/fuzz/run.py`` starts).

A script, not ``-m``: libFuzzer's ``-merge``/``-fork`` re-run ``sys.argv`` as they are, and the
target comes from the environment so that no argument of ours reads as a corpus directory.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    import atheris

    with atheris.instrument_imports(include=["edgemesh"]):
        from tests.fuzz import targets
        fn = targets.TARGETS[os.environ["EDGEMESH_FUZZ_TARGET"]]
        try:
            fn(b"")  # the targets import lazily: import (and instrument) their modules now
        except Exception:  # noqa: BLE001 - only the imports matter here
            pass
    atheris.Setup(sys.argv, fn)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
