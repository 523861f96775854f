"""List the benchmarks: every ``bench/<name>.py`` with the first line of its docstring."""
from __future__ import annotations

import ast
import os


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sorted(os.listdir(here)):
        if not entry.endswith(".py") or entry.startswith("_"):
            continue
        with open(os.path.join(here, entry), encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        name = entry[:-3]
        print(f"python -m bench.{name:<12} {doc.splitlines()[0] if doc else ''}")


if __name__ == "__main__":
    main()
