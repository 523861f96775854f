"""Test setup: gevent's patching happens here, once, before anything imports socket."""
from gevent import monkey

monkey.patch_all()

import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

from tests import netlab  # noqa: E402
from tests.procs import edgemesh_argv, free_port  # noqa: E402,F401


@pytest.fixture
def lab():
    """A fresh network-namespace lab, torn down after the test (skips without root)."""
    reason = netlab.can_run()
    if reason:
        pytest.skip(reason)
    with netlab.Lab() as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def module_lab(request: pytest.FixtureRequest) -> Iterator[tuple[netlab.Lab, str]]:
    """One lab and one temporary directory shared by a module's tests, torn down after its
    last test (skips without root). Modules build their topology on it in their own fixture."""
    reason = netlab.can_run()
    if reason:
        pytest.skip(reason)
    prefix = f"em-{request.module.__name__.rsplit('.', 1)[-1]}-"
    with netlab.Lab() as the_lab, tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield the_lab, tmp


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every namespace-lab test is also ``slow``: each builds networks and starts real agents
    (seconds at least, up to ~40 s), so ``-m "not slow"`` alone leaves a suite of seconds."""
    for item in items:
        if item.get_closest_marker("netns") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
