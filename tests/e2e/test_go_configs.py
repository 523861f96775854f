"""Every Go EdgeMesh config (tests/data/go_edgemesh/configs) starts an ``edgemesh agent`` or
``edgemesh gateway`` unchanged: each in its own network namespace (the agent makes its bridge
device there), with only the metadata source, state dir, PSK file and node name given as
flags. The process must log the file it loaded and the same warnings ``config validate``
prints, and serve /readyz with at most the tunnel not ready (the relays some files name,
1.1.1.1 or ``address1``, are unreachable here)."""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from edgemesh import cli
from tests import netlab
from tests.procs import Proc
from tests.unit.test_config_go import LOADABLE, short

pytestmark = pytest.mark.netns
ADMIN = "127.0.0.1:10557"


@pytest.fixture(scope="module")
def lab():  # type: ignore[no-untyped-def]
    reason = netlab.can_run()
    if reason:
        pytest.skip(reason)
    with netlab.Lab() as lab:
        yield lab


def command_for(path: str) -> list[str]:
    if "gateway" in os.path.basename(path):
        return ["gateway"]
    return ["agent", "--no-iptables"]


@pytest.mark.parametrize("path", LOADABLE, ids=short)
def test_go_config_starts_with_only_warnings(lab: netlab.Lab, tmp_path, path: str) -> None:
    said = CliRunner().invoke(cli.main, ["config", "validate", path])
    warnings = [w.removeprefix("warning: ") for w in said.stderr.splitlines()]
    (tmp_path / "manifests").mkdir()
    psk = tmp_path / "psk"
    psk.write_text(os.urandom(24).hex())
    psk.chmod(0o600)
    ns = lab.netns(f"g{LOADABLE.index(path)}")
    argv = [*command_for(path), "--config-file", path, "--manifests", str(tmp_path / "manifests"),
            "--state-dir", str(tmp_path / "state"), "--psk-file", str(psk),
            "--node-name", "edge-node-1", "--admin", ADMIN]
    with Proc(argv, ns=ns) as proc:
        def serving() -> bool:
            assert proc.alive(), proc.log()
            r = ns.run("curl", "-s", f"http://{ADMIN}/readyz", check=False)
            return r.stdout.startswith("[")

        netlab.wait_for(serving, timeout=30, what=f"{ADMIN}/readyz")
        netlab.wait_for(lambda: not_ready(ns) <= {"tunnel"}, timeout=15,
                        what=f"only the tunnel not ready, not {not_ready(ns)}")
        log = proc.log()
    assert f"config from {path}" in log, log
    for w in warnings:
        assert f"config {w}" in log, (w, log)
    assert "Traceback" not in log and "ERROR" not in log, log


def not_ready(ns: netlab.Netns) -> set[str]:
    text = ns.run("curl", "-s", f"http://{ADMIN}/readyz", check=False).stdout
    return {line[4:].split(":")[0] for line in text.splitlines() if line.startswith("[-] ")}
