"""Device tests: the builds for each CPU (``make release``), run here natively or under
qemu-user. They never build: without an artifact they skip, naming the make target."""
from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "devices: runs the release artifacts of each CPU "
                                       "(make test-devices builds them)")
