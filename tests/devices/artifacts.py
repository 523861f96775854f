"""Where ``make release`` leaves each CPU's builds, and the smoke run every one of them gets:
``version``, ``config default | config validate``, an agent on examples/hello answering
``dig``, SIGTERM → 0. Everything runs under ``chroot`` (the foreign CPUs through qemu-user's
binfmt_misc registration), so nothing of this machine's libraries is used."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest

from tests.netlab import wait_for
from tests.packages import mounted, procd_commands, uci_sections
from tests.procs import ROOT, free_port, http_get

CPUS = ["amd64", "arm64", "armv7"]
QEMU = {"arm64": "qemu-aarch64", "armv7": "qemu-arm"}
DEBIAN = {"amd64": "amd64", "arm64": "arm64", "armv7": "armhf"}
DIST = os.path.join(ROOT, "dist")
HELLO = "web.hello.svc.cluster.local"  # examples/hello/web.yaml
HELLO_IP = "10.96.10.10"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"  # the child's PATH is the root's


def require(path: str, target: str) -> str:
    """``path``, or skip naming the make target that builds it."""
    if not os.path.exists(path):
        pytest.skip(f"{os.path.relpath(path, ROOT)} not built: `make {target}` "
                    "(or `make test-devices`)")
    return path


def require_cpu(cpu: str) -> None:
    """Skip where this machine cannot run ``cpu``'s programs."""
    if os.geteuid() != 0:
        pytest.skip("needs root (chroot, mounts)")
    if cpu in QEMU and not os.path.exists(f"/proc/sys/fs/binfmt_misc/{QEMU[cpu]}"):
        pytest.skip(f"{QEMU[cpu]} is not registered with binfmt_misc "
                    "(apt-get install qemu-user-static)")
    if shutil.which("dig") is None:
        pytest.skip("dig not installed")


def portable_tree(cpu: str) -> str:
    return require(os.path.join(DIST, f"edgemesh-linux-{cpu}-portable"), f"portable-{cpu}")


def rootfs(cpu: str) -> str:
    return require(os.path.join(ROOT, "build-foreign", f"rootfs-{DEBIAN[cpu]}", "usr/bin/python3"),
                   f"binary-{cpu}").rsplit("/usr/bin/", 1)[0]


def in_root(root: str, *argv: str, stdin: bytes | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CHROOT, root, *argv], input=stdin, capture_output=True,
                          timeout=timeout, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})


def smoke(root: str, exe: str, work: str = "/etc/edgemesh") -> dict[str, object]:
    """The smoke run of ``exe`` (a path inside ``root``, which is mounted); returns what it
    saw: version info, the dig answer, the agent's exit code and log."""
    seen = check_cli(root, exe)
    prepare(root, work)
    dns, admin = free_port(), free_port()
    argv = [exe, "agent", "--manifests", f"{work}/manifests", "--no-iptables",
            "--state-dir", f"{work}/state", "--psk-file", f"{work}/psk",
            "--dns-listen", f"127.0.0.1:{dns}", "--admin", f"127.0.0.1:{admin}",
            "--tunnel-listen", f"127.0.0.1:{free_port()}", "--node-name", "edge-node-1"]
    return {**seen, **run_agent(root, argv, dns, admin)}


def check_cli(root: str, exe: str) -> dict[str, object]:
    """``version`` and ``config default | config validate`` in ``root``."""
    r = in_root(root, exe, "version", "--json")
    assert r.returncode == 0, r.stderr.decode()
    default = in_root(root, exe, "config", "default")
    assert default.returncode == 0, default.stderr.decode()
    valid = in_root(root, exe, "config", "validate", "/dev/stdin", stdin=default.stdout)
    assert valid.returncode == 0 and b"valid" in valid.stdout, valid.stderr.decode()
    return {"version": json.loads(r.stdout)}


def prepare(root: str, work: str = "/etc/edgemesh") -> None:
    """``work`` in ``root`` with examples/hello as ``manifests/`` and a ``psk`` (0600)."""
    inside = os.path.join(root, work.lstrip("/"))
    os.makedirs(inside, exist_ok=True)
    shutil.copytree(os.path.join(ROOT, "examples", "hello"), os.path.join(inside, "manifests"),
                    dirs_exist_ok=True)
    with open(os.open(os.path.join(inside, "psk"), os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(os.urandom(24).hex())


def run_agent(root: str, argv: list[str], dns: int, admin: int) -> dict[str, object]:
    """Run ``argv`` in ``root`` until /readyz on ``admin`` passes, ask its DNS on ``dns`` for
    the example's name, SIGTERM it: {"dig": answer, "exit": code, "log": text}."""
    log_path = os.path.join(root, "tmp", f"agent-{admin}.log")
    with open(log_path, "wb") as log:
        agent = subprocess.Popen([CHROOT, root, *argv], stdout=log, stderr=subprocess.STDOUT,
                                 env={"PATH": "/usr/bin:/bin"})
    seen: dict[str, object] = {}
    try:
        def ready() -> bool:
            assert agent.poll() is None, open(log_path).read()
            try:
                return http_get(f"http://127.0.0.1:{admin}/readyz", timeout=2)[0] == 200
            except OSError:
                return False
        wait_for(ready, timeout=90, interval=0.3, what="the agent's /readyz")
        seen["dig"] = subprocess.run(
            ["dig", "+short", "+time=5", "+tries=3", "-p", str(dns), "@127.0.0.1", HELLO],
            capture_output=True, text=True, timeout=60).stdout.strip()
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            seen["exit"] = agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()
            seen["exit"] = agent.wait()
    with open(log_path) as f:
        seen["log"] = f.read()
    os.unlink(log_path)
    return seen


def agent_from_init_script(root: str) -> dict[str, object]:
    """An OpenWrt package installed in ``root`` (with busybox), started as procd would: the
    user's part done (PSK, manifests), the agent enabled in ``/etc/config/edgemesh``, the
    installed init script run in the root to get the command, that command run there. Returns
    :func:`run_agent`'s answer; the command line and the state directory's mode are checked."""
    prepare(root)
    dns, admin = free_port(), free_port()
    cfg = uci_sections(os.path.join(root, "etc/config/edgemesh"))
    cfg["agent"].update(enabled="1", no_iptables="1", node_name="edge-node-1",
                        manifests=["/etc/edgemesh/manifests"], dns_listen=f"127.0.0.1:{dns}",
                        admin=f"127.0.0.1:{admin}", tunnel_listen=f"127.0.0.1:{free_port()}")
    with mounted(root):
        argv = procd_commands(root, cfg)["agent"]  # the init script, run in the root
        assert argv[:2] == ["/usr/bin/edgemesh", "agent"] and "--no-iptables" in argv
        assert argv[argv.index("--psk-file") + 1] == "/etc/edgemesh/psk"
        seen = run_agent(root, argv, dns, admin)  # what procd would start
    assert os.stat(os.path.join(root, "etc/edgemesh/state")).st_mode & 0o777 == 0o700
    return seen
