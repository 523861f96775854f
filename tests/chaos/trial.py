"""One fault, measured: snapshots of every agent before and after, the traffic records in
between, and the row of figures for the session's table (tests/chaos/report.py)."""
from __future__ import annotations

import time
from collections.abc import Iterable

from tests import netlab
from tests.chaos.lab import FLOWS, ChaosLab, Snapshot
from tests.chaos.report import Row

STEADY = 1.5  # seconds every flow must have succeeded, and none failed, to count as flowing
FD_MARGIN = 16  # descriptors an agent may hold above its count before the fault
# failures one run of a fault may cause on a flow it should leave alone: one 2 s client timeout
# was seen a few times in 100-kill runs on a loaded 2-core machine (DNS once after a NAT flush,
# UDP once with the API away); a flow the fault breaks fails many times, and every failure is
# counted in the table either way
TOLERATED = 1


def flowing(lab: ChaosLab, since: float) -> bool:
    now = time.monotonic()
    recent = [r for r in lab.events.read() if r["t"] > max(since, now - STEADY)]
    if any(not r["ok"] for r in recent):
        return False
    return {r["flow"] for r in recent} >= set(FLOWS)


def wait_flowing(lab: ChaosLab, since: float, timeout: float) -> float:
    """The moment every flow has been succeeding for STEADY seconds (after ``since``)."""
    def check() -> bool:
        if lab.traffic.poll() is not None:
            raise AssertionError("the traffic process ended")
        return flowing(lab, since)
    netlab.wait_for(check, timeout, 0.25, what="every traffic flow succeeding again")
    return time.monotonic()


class Trial:
    """``with Trial(lab, row, may_fail) as t: ...inject...; t.restored()``: on exit, waits
    for traffic to flow again and adds this run's figures to ``row``."""

    def __init__(self, lab: ChaosLab, row: Row, may_fail: Iterable[str] = ()) -> None:
        self.lab, self.row, self.may_fail = lab, row, set(may_fail)
        self.before: dict[str, Snapshot] = {}
        self.t_fault = self.t_restore = 0.0

    def __enter__(self) -> "Trial":
        wait_flowing(self.lab, 0, 120)
        self.before = self.lab.snapshots()
        self.t_fault = self.t_restore = time.monotonic()
        return self

    def restored(self) -> None:
        """The fault is over (servers back, link healed): recovery is timed from now."""
        self.t_restore = time.monotonic()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            return
        try:
            done = wait_flowing(self.lab, self.t_restore, self.row.bound_s + 30)
        except TimeoutError:
            done = time.monotonic()
            self.row.note = (self.row.note or "") + " did not recover in bound+30 s;"
        self.account(self.lab.events.between(self.t_fault, done))
        time.sleep(0.5)  # connections being closed finish closing
        self.compare(self.lab.snapshots())

    def account(self, rows: list[dict]) -> None:
        recovery = 0.0
        for flow in FLOWS:
            mine = [r for r in rows if r["flow"] == flow]
            fails = [r["t"] for r in mine if not r["ok"]]
            if not fails:
                continue
            self.row.failed_flows[flow] = self.row.failed_flows.get(flow, 0) + len(fails)
            self.row.worst_run[flow] = max(self.row.worst_run.get(flow, 0), len(fails))
            self.row.errors.setdefault(flow, next(r["err"] for r in mine if not r["ok"]))
            back = min((r["t"] for r in mine if r["ok"] and r["t"] > max(fails)),
                       default=rows[-1]["t"] if rows else self.t_restore)
            recovery = max(recovery, back - self.t_restore)
        self.row.runs += 1
        self.row.recovery_s.append(round(recovery, 2))
        self.row.failed += sum(1 for r in rows if not r["ok"])
        lost = [r for r in rows if r["lost"]]
        self.row.lost += len(lost)
        self.row.lost_avoidable += sum(1 for r in lost if r["flow"] not in self.may_fail)

    def compare(self, after: dict[str, Snapshot]) -> None:
        for node, old in self.before.items():
            new = after[node]
            self.row.fd_delta = max(self.row.fd_delta, new.fds - old.fds)
            self.row.rss_delta_mb = max(self.row.rss_delta_mb, (new.rss_kb - old.rss_kb) / 1024)
            leaked = set(new.rules) ^ set(old.rules)
            self.row.leaked_rules += len(leaked)
            self.row.duplicate_rules += len(new.duplicates())
            if new.duplicates():
                self.row.note += f" {node} duplicate rules: {new.duplicates()[:4]};"
            if leaked:
                self.row.note += f" {node} rules changed: {sorted(leaked)[:4]};"


def check(row: Row, may_fail: Iterable[str]) -> None:
    """The assertions every fault shares; the row is in the table whatever they say."""
    unexpected = {f: n for f, n in row.worst_run.items()
                  if f not in set(may_fail) and n > TOLERATED}
    assert not unexpected, (f"{row.fault}: flows that should have carried on failed: "
                            f"{unexpected} ({row.errors})")
    assert row.lost_avoidable == 0, f"{row.fault}: connections lost on untouched paths"
    assert row.recovery_max <= row.bound_s, \
        f"{row.fault}: recovery {row.recovery_s} s, bound {row.bound_s} s ({row.note})"
    assert row.leaked_rules == 0, f"{row.fault}: iptables rules changed: {row.note}"
    assert row.duplicate_rules == 0, f"{row.fault}: duplicate iptables rules"
    assert row.fd_delta <= FD_MARGIN, f"{row.fault}: {row.fd_delta} more descriptors"
