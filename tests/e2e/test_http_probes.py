"""Every HTTP attack probe of ``tests/http_probes.py`` against a real ``edgemesh gateway`` and a
real agent's per-request HTTP proxy, on loopback, each in front of a recording backend that
parses strictly what it receives (``tests/recording_backend.py``).

The gateway carries the probe routes (``app.example.com``: ``/admin`` prefix denied with a 403
``directResponse``, the rest to the backend; ``*.example.com``: all to the backend); the agent
serves one Service. Route probes run only against the gateway; framing, smuggling, upgrade,
Expect, syntax, ReDoS and limit probes against both. A failure names the probe, its class, the
reference it comes from, the exact bytes and why it was judged UNSAFE.

``python -m bench.http_probes`` runs the same probes against nginx and haproxy too.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.http_probes import PROBES, Probe
from tests.probe_fronts import Running, start_agent, start_gateway
from tests.probe_runner import Front, recover, run_probe

pytestmark = pytest.mark.slow  # ~3.5 min: 197 probes against a real gateway and proxy


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = start_gateway(str(tmp_path_factory.mktemp("probes-gw")))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = start_agent(str(tmp_path_factory.mktemp("probes-agent")))
    yield running
    running.stop()


def _check(probe: Probe, front: Front) -> None:
    verdict = run_probe(probe, front)
    if not verdict.safe:
        recover(front)  # a frozen or wedged front end must not fail the probes after this one
    assert verdict.safe, (f"{probe.name} [{probe.kind.value}; {probe.ref}] UNSAFE: "
                          f"{verdict.reason}\nsent: {probe.writes!r}")


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.name)
def test_gateway(probe: Probe, gateway: Running) -> None:
    _check(probe, gateway.front)


@pytest.mark.parametrize("probe", [p for p in PROBES if not p.routes], ids=lambda p: p.name)
def test_per_request_proxy(probe: Probe, proxy: Running) -> None:
    _check(probe, proxy.front)


@pytest.mark.parametrize("which", ["gateway", "proxy"])
def test_bad_input_logged_without_traceback(which: str, request: pytest.FixtureRequest) -> None:
    """After the probes (this test runs last in the module): still serving, and no traceback
    in the log — bad input is counted and logged once, never a stack trace."""
    running: Running = request.getfixturevalue(which)
    log = running.log_text()
    assert running.proc.poll() is None, log[-3000:]
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:3000]
