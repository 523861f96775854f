"""The loopback benches' child processes: started pinned to the proxies' core, stopped
together, and the CPU time each one spent (from ``/proc``).

bench.proxy and bench.http subclass ``Children`` for their Bench.
"""
from __future__ import annotations

import os
import subprocess


def cpu_seconds(pid: int | None) -> float:
    """User plus system CPU seconds ``pid`` has used so far; 0.0 for no process."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Children:
    """Processes a bench started; ``stop()`` ends them, the last started first."""

    def __init__(self, server_cpu: str) -> None:
        self.server_cpu = server_cpu
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], pin: bool = True, **kw: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` (on the server core with ``pin``); stdout discarded, stderr too
        unless ``stderr=`` says where."""
        full = (["taskset", "-c", self.server_cpu] if pin else []) + argv
        proc = subprocess.Popen(full, stdout=subprocess.DEVNULL,  # type: ignore[call-overload]
                                stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """Terminate every child, then wait up to 10 s for each and kill what is left."""
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
