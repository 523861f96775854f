"""Write docs/configuration.md from the config schema: `python docs/gen_config_reference.py`."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgemesh.config import reference_rows  # noqa: E402

HEADER = """# Configuration reference

Generated from `edgemesh/config.py` by `python docs/gen_config_reference.py`; a test fails when
this file and the schema differ. `edgemesh config default` prints the same keys as a commented
YAML file; `edgemesh config validate FILE` checks one. Flags override the file; the file
overrides these defaults; `NODE_NAME` overrides `nodeName` from the file.

| key | default | meaning |
|---|---|---|
"""


def render() -> str:
    rows = [f"| `{key}` | `{default}` | {doc} |" for key, default, doc in reference_rows()]
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configuration.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render())
