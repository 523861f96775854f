"""Helper programs (``ip``, ``iptables*``): the host's environment, and a missing one said in
one line naming it and what needs it, never a traceback (issue 15, item 3)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import gevent
import pytest

from edgemesh import netdev
from edgemesh.errors import ConfigError
from edgemesh.runtime import tasks
from edgemesh.tunnel import addresses
from tests.procs import ROOT, Proc, free_port, wait_ready

BUNDLE = {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/usr/lib/edgemesh/_internal",
          "_PYI_APPLICATION_HOME_DIR": "/usr/lib/edgemesh/_internal",
          "_PYI_PARENT_PROCESS_LEVEL": "1", "HOME": "/root"}


def test_frozen_restores_the_original_library_path() -> None:
    env = tasks.host_environment({**BUNDLE, "LD_LIBRARY_PATH_ORIG": "/opt/lib"}, frozen=True)
    assert env == {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib", "HOME": "/root"}


def test_frozen_without_an_original_drops_the_library_path() -> None:
    assert tasks.host_environment(BUNDLE, frozen=True) == {"PATH": "/usr/bin", "HOME": "/root"}


def test_from_source_the_environment_is_untouched() -> None:
    assert tasks.host_environment(BUNDLE, frozen=False) == BUNDLE


def test_run_gives_the_child_the_host_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/bundle")
    monkeypatch.setenv("LD_LIBRARY_PATH_ORIG", "/host-lib")
    out = tasks.run(["sh", "-c", 'echo "$LD_LIBRARY_PATH|${LD_LIBRARY_PATH_ORIG-unset}"'])
    assert out.stdout.decode().strip() == "/host-lib|unset"
    monkeypatch.delenv("LD_LIBRARY_PATH_ORIG")
    out = tasks.run(["sh", "-c", 'echo "${LD_LIBRARY_PATH-unset}"'])
    assert out.stdout.decode().strip() == "unset"


@pytest.mark.parametrize(("program", "names"), [
    ("ip", ["'ip'", "iproute2", "ip-full", "edgemesh0"]),
    ("iptables-restore", ["'iptables-restore'", "--no-iptables", "iptables-nft"]),
    ("ip6tables-save", ["'ip6tables-save'", "service interception"]),
    ("conntrack", ["'conntrack'", "install conntrack"]),
])
def test_a_missing_helper_names_itself_and_what_needs_it(
        program: str, names: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(tasks.MissingHelper) as caught:
        tasks.run([program, "-h"])
    e = caught.value
    # still what callers that tolerate a missing program catch, and what the CLI exits 2 on
    assert isinstance(e, FileNotFoundError) and isinstance(e, ConfigError)
    assert e.problems == [str(e)] and "\n" not in str(e)
    for name in names:
        assert name in str(e)
    assert str(tmp_path) in str(e)


def test_the_caller_can_say_what_needs_it(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: object) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(tasks.MissingHelper, match="needed for the tunnel's LAN list"):
        tasks.run(["ip", "addr"], need="the tunnel's LAN list")


def test_a_program_that_runs_but_fails_is_not_missing() -> None:
    with pytest.raises(subprocess.CalledProcessError):
        tasks.run(["sh", "-c", "exit 3"])


def test_listing_addresses_without_ip_finds_none_and_says_so_once(
        monkeypatch: pytest.MonkeyPatch, tmp_path: object,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(netdev, "_missing_ip_logged", False)

    def refused() -> None:
        raise PermissionError("netlink refused")
    monkeypatch.setattr(netdev.netlink, "dump_addresses", refused)  # netlink first, then ip
    with caplog.at_level(logging.WARNING):
        assert netdev.local_addresses() == set()
        assert netdev.addresses_by_device() == {}
        assert addresses.local_ipv4() == []
    lines = [r for r in caplog.records if "helper program 'ip'" in r.getMessage()]
    assert len(lines) == 1  # once (not three times): the tunnel reads the same list
    assert all(r.exc_info is None for r in caplog.records)


def test_a_task_stopped_by_a_missing_helper_logs_one_line(
        caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def reconcile() -> None:
        calls.append(1)
        raise tasks.MissingHelper("iptables-restore")

    rec = tasks.Reconciler("test-missing-helper", reconcile, retry=0.01)
    with caplog.at_level(logging.ERROR):
        rec.start()
        gevent.sleep(0.1)
        rec.stop()
        done = tasks.spawn("test-missing-helper-task", reconcile)
        done.join()
    assert len(calls) >= 3 and done.successful()
    assert "'iptables-restore' not found" in rec.last_error  # what /readyz shows
    lines = [r for r in caplog.records if "iptables-restore" in r.getMessage()]
    assert len(lines) == 2 and all(r.exc_info is None for r in lines)


def _no_ip_path(tmp_path: object) -> str:
    """A PATH with sh and friends but no ``ip``."""
    bin_dir = os.path.join(str(tmp_path), "bin")
    os.makedirs(bin_dir)
    for tool in ("sh", "cat", "env"):
        os.symlink(f"/bin/{tool}", os.path.join(bin_dir, tool))
    return bin_dir


def test_agent_without_ip_serves_dns_on_loopback(tmp_path: object) -> None:
    """The agent a router runs with --no-iptables and DNS on 127.0.0.1 needs no ``ip``."""
    admin = f"127.0.0.1:{free_port()}"
    psk = os.path.join(str(tmp_path), "psk")
    with open(psk, "w") as f:
        f.write("x" * 32)
    args = ["agent", "--manifests", os.path.join(ROOT, "examples", "hello"), "--no-iptables",
            "--state-dir", str(tmp_path), "--psk-file", psk, "--node-name", "edge-node-1",
            "--dns-listen", f"127.0.0.1:{free_port()}", "--admin", admin,
            "--tunnel-listen", f"127.0.0.1:{free_port()}"]
    with Proc(args, env={"PATH": _no_ip_path(tmp_path)}) as agent:
        wait_ready(agent, admin)
        assert agent.stop() == 0
        log = agent.log()
    # addresses come from netlink now, so nothing here needs ip; were it asked for, it would
    # be one line each, never a traceback
    assert "Traceback" not in log


def test_agent_that_must_create_its_device_without_ip_exits_2_naming_it(tmp_path: object) -> None:
    psk = os.path.join(str(tmp_path), "psk")
    with open(psk, "w") as f:
        f.write("x" * 32)
    args = ["agent", "--manifests", os.path.join(ROOT, "examples", "hello"), "--no-iptables",
            "--state-dir", str(tmp_path), "--psk-file", psk, "--node-name", "edge-node-1",
            "--dns-listen", f"169.254.96.16:{free_port()}", "--admin", "",
            "--tunnel-listen", f"127.0.0.1:{free_port()}"]
    with Proc(args, env={"PATH": _no_ip_path(tmp_path)}) as agent:
        assert agent.popen.wait(timeout=30) == 2
        log = agent.log()
    assert "error: helper program 'ip' not found" in log and "iproute2" in log
    assert "Traceback" not in log
