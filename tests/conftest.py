"""Test setup: gevent's patching happens here, once, before anything imports socket."""
from gevent import monkey

monkey.patch_all()

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
