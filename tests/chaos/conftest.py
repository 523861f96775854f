"""The chaos lab, built once for the fault tests, and the table printed at the session's end."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

from tests import netlab
from tests.chaos import report
from tests.chaos.lab import ChaosLab
from tests.procs import ROOT


@pytest.fixture(scope="module")
def chaos() -> Iterator[ChaosLab]:
    """The lab and its traffic, torn down after the module (5 agents and a traffic process
    must not keep running through the rest of ``make test``)."""
    reason = netlab.can_run()
    for tool in ("socat", "conntrack", "curl", "dig"):
        if not reason and not _which(tool):
            reason = f"needs {tool}"
    if not reason and not os.path.exists("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"):
        reason = "needs libfaketime (Debian package faketime)"
    if reason:
        pytest.skip(reason)
    with netlab.Lab() as lab, tempfile.TemporaryDirectory(prefix="em-chaos-") as tmp:
        the_lab = ChaosLab(lab, tmp)
        try:
            yield the_lab
        finally:
            the_lab.close()


def _which(tool: str) -> bool:
    import shutil
    return shutil.which(tool) is not None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not report.ROWS:
        return
    path = report.report_path(ROOT)
    report.write_json(path)
    mode = os.environ.get("EDGEMESH_CHAOS", "short")
    terminalreporter.section(f"chaos ({mode}): faults under traffic")
    terminalreporter.write_line(report.table())
    terminalreporter.write_line(f"(JSON: {path})")
