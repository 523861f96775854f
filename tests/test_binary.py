"""The frozen binary, tested as a user runs it: ``make binary`` builds ``dist/edgemesh`` (once,
and again only when a source is newer), then we run ``version``, ``config``, an agent and
``status`` with it, and check what PyInstaller left out was never needed."""
from __future__ import annotations

import json
import os
import pkgutil
import re
import shutil
import signal
import subprocess
import sys

import pytest

import edgemesh
from edgemesh import __version__
from tests.procs import ROOT, Proc, free_port, wait_ready

pytestmark = pytest.mark.binary

BINARY = os.path.join(ROOT, "dist", "edgemesh")
WORK = os.path.join(ROOT, "build-pyinstaller", "edgemesh")
ONEDIR = os.path.join(ROOT, "dist", "edgemesh-onedir", "edgemesh")
ONEFILE_BUDGET = 20 * 1024 * 1024  # bytes; the onefile size target (README, Benchmarks: binary)
SOURCES = ("edgemesh", "edgemesh.py", "packaging/edgemesh.spec", "constraints.txt")

# Importers that PyInstaller names for modules it did not really import: the script (stdlib
# modules the bootloader collects), hooks' hidden imports (attributed to the hooked package),
# and modules that are themselves never bundled.
ATTRIBUTED = {"gevent", "encodings", "encodings.bz2_codec", "zipimport",
              "gevent.libev.watcher", "gevent.libuv._corecffi_build"}


def newest_source() -> float:
    newest = 0.0
    for rel in SOURCES:
        path = os.path.join(ROOT, rel)
        if os.path.isfile(path):
            newest = max(newest, os.path.getmtime(path))
            continue
        for dirpath, _, files in os.walk(path):
            for name in files:
                if name.endswith(".py"):
                    newest = max(newest, os.path.getmtime(os.path.join(dirpath, name)))
    return newest


def built(target: str, path: str, work: str) -> str:
    """``path``, built by ``make target`` unless it is newer than every source."""
    pytest.importorskip("PyInstaller")
    fresh = os.path.exists(path) and os.path.getmtime(path) >= newest_source()
    if not fresh or not os.path.exists(os.path.join(work, "warn-edgemesh.txt")):
        r = subprocess.run(["make", "-s", target], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"make {target} failed:\n{r.stdout}\n{r.stderr}"
    return path


@pytest.fixture(scope="module")
def binary() -> str:
    """``dist/edgemesh``: the onefile build."""
    return built("binary", BINARY, WORK)


def test_onedir_build_runs() -> None:
    exe = built("onedir", ONEDIR, os.path.join(ROOT, "build-pyinstaller", "onedir", "edgemesh"))
    info = json.loads(run(exe, "version", "--json").stdout)
    assert info == {**info, "frozen": True, "version": __version__}
    r = run(exe, "config", "default")
    assert r.returncode == 0 and "edgeTunnel:" in r.stdout


def run(binary: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_version_says_frozen(binary: str) -> None:
    r = run(binary, "version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"edgemesh {__version__}"
    info = json.loads(run(binary, "version", "--json").stdout)
    assert info["frozen"] is True and info["version"] == __version__


def test_help_survives_stripped_docstrings(binary: str) -> None:
    # the build uses optimize=2 (no docstrings): every command passes its help text to click
    from edgemesh.cli import main

    top = run(binary, "--help")
    assert top.returncode == 0, top.stderr
    assert main.help and main.help.splitlines()[0] in top.stdout
    for name, command in main.commands.items():
        assert re.search(rf"^  {name} +\S", top.stdout, re.M), f"{name}: no help in --help"
        r = run(binary, name, "--help")
        assert r.returncode == 0, r.stderr
        first = " ".join(command.help.split("\n\n")[0].split()) if command.help else ""
        assert first and first in " ".join(r.stdout.split()), name  # click re-wraps lines
    r = run(binary, "agent", "--help")
    assert "Run the node agent" in r.stdout and "--manifests" in r.stdout


def test_config_default_is_valid_and_matches_source(binary: str, tmp_path) -> None:
    from edgemesh.config import render_default
    r = run(binary, "config", "default")
    assert r.returncode == 0, r.stderr
    assert r.stdout == render_default()
    path = tmp_path / "default.yaml"
    path.write_text(r.stdout)
    v = run(binary, "config", "validate", str(path))
    assert v.returncode == 0, v.stderr
    assert "valid" in v.stdout


def test_bad_config_exits_2_naming_the_key(binary: str, tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("modules:\n  edgeDNS:\n    listenPort: 99999\n  edgeProxy:\n    bogus: 1\n")
    r = run(binary, "config", "validate", str(path))
    assert r.returncode == 2
    assert "modules.edgeDNS.listenPort" in r.stderr
    assert "modules.edgeProxy.bogus: unknown key" in r.stderr


def test_agent_serves_examples_and_stops_on_sigterm(binary: str, tmp_path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("modules:\n  edgeDNS: {enable: false}\n  edgeProxy: {enable: false}\n"
                      "  edgeTunnel: {enable: false}\n")
    admin = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("EDGEMESH_BIN", binary)
    with Proc(["agent", "--config", str(config), "--manifests", "examples/hello",
               "--no-iptables", "--admin", admin, "--state-dir", str(tmp_path / "state"),
               "--node-name", "edge-node-1"]) as agent:
        wait_ready(agent, admin)
        status = run(binary, "status", "--admin", admin)
        assert status.returncode == 0, status.stderr
        assert "node edge-node-1 (agent" in status.stdout
        assert "hello/web" in status.stdout and "10.96.10.10" in status.stdout
        as_json = json.loads(run(binary, "status", "--admin", admin, "--json").stdout)
        assert {s["name"] for s in as_json["services"]} >= {"web", "echo", "db"}
        assert agent.stop(signal.SIGTERM) == 0, agent.log()


def test_agent_with_every_module_starts(binary: str, tmp_path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS, proxy (no iptables) and tunnel on loopback start from the binary, not only what
    ``version`` needs. (cryptography loads at the first handshake and dnslib at the first
    answer: the relay and DNS smoke tests run those against the binary.)"""
    from edgemesh.agent import MODULES
    psk = tmp_path / "psk"
    psk.write_text(os.urandom(24).hex())
    psk.chmod(0o600)
    dns_port = free_port()  # free for UDP too: DNS binds both
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"modules:\n"
        f"  edgeDNS: {{listenAddress: 127.0.0.1, listenPort: {dns_port},\n"
        f"             cacheDNS: {{upstreamServers: ['127.0.0.1:{free_port()}']}}}}\n"
        f"  edgeProxy: {{iptables: false, listenAddress: 127.0.0.1}}\n"
        f"  edgeTunnel: {{listenAddress: 127.0.0.1, listenPort: {free_port()},\n"
        f"               psk: {{path: '{psk}'}}}}\n")
    admin = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("EDGEMESH_BIN", binary)
    with Proc(["agent", "--config", str(config), "--manifests", "examples/hello",
               "--no-iptables", "--admin", admin, "--state-dir", str(tmp_path / "state"),
               "--node-name", "edge-node-1"]) as agent:
        wait_ready(agent, admin)
        enabled = [s for s, _ in MODULES if s in ("edgeDNS", "edgeProxy", "edgeTunnel")]
        log = agent.log()
        assert "Traceback" not in log, log
        assert len(re.findall(r"module \S+ started", log)) == len(enabled), log
        if shutil.which("dig") and any(s == "edgeDNS" for s, _ in MODULES):
            r = subprocess.run(["dig", "+short", "+time=2", "+tries=2", "-p", str(dns_port),
                                "@127.0.0.1", "web.hello.svc.cluster.local"],
                               capture_output=True, text=True, timeout=15)
            assert r.stdout.split() == ["10.96.10.10"], (r.stdout, agent.log())
        assert agent.stop(signal.SIGTERM) == 0, agent.log()


def test_every_edgemesh_module_is_frozen(binary: str) -> None:
    """agent.MODULES and cleanup.CLEANERS import by name: the spec must bundle them all."""
    from edgemesh import agent, cleanup
    toc = open(os.path.join(WORK, "PYZ-00.toc"), encoding="utf-8").read()
    frozen = set(re.findall(r"'(edgemesh(?:\.[\w.]+)?)'", toc))
    wanted = {"edgemesh"} | {m.name for m in pkgutil.walk_packages(edgemesh.__path__,
                                                                     "edgemesh.")}
    wanted |= {target.partition(":")[0] for _, target in agent.MODULES}
    wanted |= {target.partition(":")[0] for target in cleanup.CLEANERS}
    assert wanted - frozen == set()


def excluded_imports(warn_text: str) -> list[tuple[str, str, str]]:
    """(module, importer, kinds) for every module the spec excluded that something imports.

    Missing modules are not listed: they are missing from the source tree too."""
    out = []
    for line in warn_text.splitlines():
        m = re.match(r"excluded module named (\S+) - imported by (.*)", line)
        if not m:
            continue
        for importer, kinds in re.findall(r"([^,(]+?) \(([^)]*)\)", m.group(2)):
            out.append((m.group(1).strip("'"), importer.strip(), kinds))
    return out


def test_nothing_needed_is_excluded(binary: str) -> None:
    """No module of ours, and no module we bundle, needs at import time what we left out."""
    warn = open(os.path.join(WORK, "warn-edgemesh.txt"), encoding="utf-8").read()
    problems = []
    for module, importer, kinds in excluded_imports(warn):
        if importer.startswith("edgemesh"):
            problems.append(f"{importer} imports {module} ({kinds})")
        elif ("top-level" in kinds and importer not in ATTRIBUTED
              and not importer.endswith(".py") and sys.platform.startswith("linux")
              and not module.startswith(("nt", "_win", "msvcrt", "winreg", "java", "org",
                                         "vms_lib", "_overlapped", "annotationlib"))):
            problems.append(f"{importer} imports {module} at top level")
    assert problems == [], "\n".join(problems)


def test_onefile_fits_the_budget(binary: str) -> None:
    size = os.path.getsize(binary)
    assert size <= ONEFILE_BUDGET, f"dist/edgemesh is {size / 1e6:.1f} MB"
