"""Figures of one fault run, collected across the session and printed as one table at its end
(tests/chaos/conftest.py) and written as JSON (``$EDGEMESH_CHAOS_REPORT``, default
``.state/chaos-report.json``)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

ROWS: list["Row"] = []


@dataclass
class Row:
    fault: str
    runs: int = 0
    bound_s: float = 0.0
    recovery_s: list[float] = field(default_factory=list)  # per run
    failed: int = 0  # requests or ticks that failed, all flows
    lost: int = 0  # long-lived connections that broke
    lost_avoidable: int = 0  # ... on flows whose path the fault did not touch
    failed_flows: dict[str, int] = field(default_factory=dict)
    worst_run: dict[str, int] = field(default_factory=dict)  # flow -> most failures in one run
    errors: dict[str, str] = field(default_factory=dict)  # flow -> its first error
    fd_delta: int = 0  # max over agents, after minus before
    rss_delta_mb: float = 0.0  # max over agents
    leaked_rules: int = 0
    duplicate_rules: int = 0
    note: str = ""

    @property
    def recovery_max(self) -> float:
        return max(self.recovery_s, default=0.0)

    @property
    def recovery_median(self) -> float:
        values = sorted(self.recovery_s)
        return values[len(values) // 2] if values else 0.0


HEAD = ("fault", "runs", "recovery s (median/max)", "bound s", "failed", "conns lost",
        "lost, avoidable", "fd delta", "RSS delta MB", "rules leaked/dup")


def table() -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for r in ROWS:
        cells = (r.fault, str(r.runs), f"{r.recovery_median:.1f} / {r.recovery_max:.1f}",
                 f"{r.bound_s:g}", str(r.failed), str(r.lost), str(r.lost_avoidable),
                 f"{r.fd_delta:+d}", f"{r.rss_delta_mb:+.1f}",
                 f"{r.leaked_rules}/{r.duplicate_rules}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r.fault}: {r.note}" for r in ROWS if r.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def write_json(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump([{**asdict(r), "recovery_max": r.recovery_max} for r in ROWS], f, indent=1)


def report_path(root: str) -> str:
    return os.environ.get("EDGEMESH_CHAOS_REPORT", os.path.join(root, ".state",
                                                                "chaos-report.json"))
