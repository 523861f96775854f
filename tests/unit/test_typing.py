"""The whole package type-checks with ``mypy --strict`` (STYLE: typed code; issue 19): every
function annotated, no implicit Any returned, no stale ``type: ignore``."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mypy", path=os.path.dirname(sys.executable)) is None,
                    reason="mypy is not installed (make setup installs it)")
def test_edgemesh_type_checks_strictly() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "edgemesh"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
