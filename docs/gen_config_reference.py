"""Write docs/configuration.md from the config schema: `python docs/gen_config_reference.py`."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgemesh.config import reference_rows  # noqa: E402
from edgemesh.config_go import reference_rows as go_rows  # noqa: E402

HEADER = """# Configuration reference

Generated from `edgemesh/config.py` by `python docs/gen_config_reference.py`; a test fails when
this file and the schema differ. `edgemesh config default` prints the same keys as a commented
YAML file; `edgemesh config validate FILE` checks one. Flags override the file; the file
overrides these defaults; `NODE_NAME` overrides `nodeName` from the file.

| key | default | meaning |
|---|---|---|
"""


GO_HEADER = """
## Moving from the Go EdgeMesh

Every key of the Go EdgeMesh's config (kubeedge/edgemesh v1.12 to v1.17) loads; this table,
generated from `edgemesh/config_go.py`, says what each becomes. Keys are matched in any case,
as Go did (`Mode`, `NodeName`; a key of ours in another case loads with a warning naming its
spelling). An ignored key gives one warning at start, and `edgemesh config validate` prints
the same warnings and exits 0; a key nobody ever had still exits 2. `[]` marks the items of a
list. See [migration-from-go.md](migration-from-go.md) for the whole move.

| Go key | here |
|---|---|
"""


def render() -> str:
    rows = [f"| `{key}` | `{default}` | {doc} |" for key, default, doc in reference_rows()]
    go = [f"| `{key}` | {fate} |" for key, fate in go_rows()]
    return HEADER + "\n".join(rows) + "\n" + GO_HEADER + "\n".join(go) + "\n"


if __name__ == "__main__":
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configuration.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render())
