"""Hole punching: time from first packet to a punched path, and the share of punches that work.

Builds the NAT matrix lab (tests/e2e/test_nat_matrix.py: two MASQUERADE sites that drop
unsolicited inbound packets, two servers and a relaying agent). Each trial restarts a1 and b1
(no sessions, no records, no cached paths), then a1 curls a service on b1; the time is from
curl's start to the ``punch-tcp`` ok attempt in ``edgemesh status --json``. The peer tool is a
bare TCP simultaneous open between the same two namespaces (two Python sockets that already
know each other's public address, started together): the floor for a punch on these NATs.

    .venv/bin/python -m bench.punch [--trials 20] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import time
from statistics import median

from bench.report import add_json_flag, emit
from tests import netlab
from tests.e2e.test_nat_matrix import WAN, Matrix, fresh_cell

RAW_PUNCH = textwrap.dedent("""
    import socket, sys, time
    peer, port, start_at = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.settimeout(5)
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.monotonic()
    try:
        s.connect((peer, port)); print(time.monotonic() - t0)
    except OSError as e:
        print("failed", e)
""")


def edgemesh_trial(m: Matrix) -> float | None:
    """Seconds from a1's first packet to b1 to the punched session; None if it was relayed."""
    fresh_cell(m, "masquerade", "masquerade")
    start = time.time()
    if m.curl("a1", "10.96.2.1") != "hello from b1":
        return None
    try:
        p = m.wait_path("a1", "b1", "punched", 10)
    except AssertionError:
        return None
    ok = [a["at"] for a in p["attempts"] if a["path"] == "punch-tcp" and a["result"] == "ok"]
    took = ok[0] - start if ok else None
    if took is None or took > 1.0:  # say what the slow or failed trial went through
        steps = [(round(a["at"] - start, 3), a["path"], a["result"], a["reason"])
                 for a in p["attempts"]]
        print(f"slow trial ({took}): {steps}", file=sys.stderr)
    return took


def raw_trial(m: Matrix, port: int) -> float | None:
    start_at = time.time() + 0.5
    procs = [m.ns[node].popen([sys.executable, "-c", RAW_PUNCH, WAN[other], str(port),
                               str(start_at)], stdout=-1)
             for node, other in (("a1", "b"), ("b1", "a"))]
    outs = [p.communicate(timeout=15)[0].decode().strip() for p in procs]
    try:
        return max(float(o) for o in outs)
    except ValueError:
        return None


def summary(name: str, times: list[float | None]) -> tuple[float, float]:
    ok = [t for t in times if t is not None]
    share = len(ok) / len(times)
    med = median(ok) if ok else float("nan")
    print(f"{name:28} punched {len(ok)}/{len(times)} ({share:.0%}), median "
          f"{med * 1000:.1f} ms, min {min(ok, default=float('nan')) * 1000:.1f} ms, "
          f"max {max(ok, default=float('nan')) * 1000:.1f} ms")
    return share, med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    add_json_flag(parser)
    args = parser.parse_args()
    reason = netlab.can_run()
    if reason:
        sys.exit(f"cannot build the lab: {reason}")
    with netlab.Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        m = Matrix(lab, tmp)
        try:
            ours = [edgemesh_trial(m) for _ in range(args.trials)]
            raw = [raw_trial(m, 31000 + i) for i in range(args.trials)]
        finally:
            for p in [*m.agents.values(), *m.relays.values()]:
                p.stop()
    _, med_ours = summary("edgemesh (curl -> punched)", ours)
    _, med_raw = summary("raw simultaneous open", raw)
    print(json.dumps({"trials": args.trials, "median_ms": round(med_ours * 1000, 1),
                      "success_share": sum(t is not None for t in ours) / len(ours),
                      "raw_median_ms": round(med_raw * 1000, 2),
                      "ratio_vs_raw": round(med_ours / med_raw, 1) if med_raw else None}))
    if args.json:
        emit("punch", {"punch time edgemesh/raw": med_ours / med_raw if med_raw else 0.0,
                       "punched share": sum(t is not None for t in ours) / len(ours)},
             {"edgemesh ms": med_ours * 1000, "raw ms": med_raw * 1000},
             {"raw": "TCP simultaneous open between the same namespaces, addresses known"})


if __name__ == "__main__":
    main()
