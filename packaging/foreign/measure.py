"""Measure builds against each other: size, ``version`` start time, idle agent RSS and bytes
written to the temporary directory (the table in packaging/README.md).

    python3 packaging/foreign/measure.py [RUNS]        (root: the portable build runs chrooted)

Builds measured when present: dist/edgemesh (onefile), dist/edgemesh-onedir/ (onedir),
dist/edgemesh-linux-amd64-portable/ (onedir + its own glibc, in a root holding nothing else).
Start times are medians of RUNS paired runs (A B C A B C ...), so load on the machine hits
every build alike; RSS is the sum over the build's processes (onefile: bootloader + agent).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIST = os.path.join(REPO, "dist")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.lstat(os.path.join(d, n)).st_size for d, _, names in os.walk(path)
               for n in names)


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and its descendants."""
    total = 0
    for entry in filter(str.isdigit, os.listdir("/proc")):
        if int(entry) != pid and not _descends(int(entry), pid):
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
        if pid == ancestor:
            return True
    return False


class Build:
    def __init__(self, name: str, argv: list[str], size_of: str, root: str = "") -> None:
        self.name, self.argv, self.size, self.root = name, argv, tree_bytes(size_of), root
        self.starts: list[float] = []

    def command(self, *args: str) -> list[str]:
        chroot = [shutil.which("chroot") or "/usr/sbin/chroot", self.root] if self.root else []
        return chroot + self.argv + list(args)

    def time_version(self, tmp: str) -> None:
        start = time.monotonic()
        subprocess.run(self.command("version"), check=True, capture_output=True,
                       env={"PATH": "/usr/bin:/bin", "TMPDIR": "/tmp" if self.root else tmp})
        self.starts.append(time.monotonic() - start)

    def idle(self, tmp: str, work: str) -> tuple[int, int]:
        """(idle RSS KiB, bytes under TMPDIR) of an agent on examples/hello."""
        dns, admin = free_port(), free_port()
        inside = work if not self.root else "/work"
        agent = subprocess.Popen(
            self.command("agent", "--manifests", f"{inside}/hello", "--no-iptables",
                         "--state-dir", f"{inside}/state", "--psk-file", f"{inside}/psk",
                         "--dns-listen", f"127.0.0.1:{dns}", "--admin", f"127.0.0.1:{admin}",
                         "--tunnel-listen", f"127.0.0.1:{free_port()}", "--node-name", "m"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": "/tmp" if self.root else tmp})
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            time.sleep(3)
            return rss_kib(agent.pid), tree_bytes(os.path.join(self.root, "tmp") if self.root
                                                  else tmp)
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)


def main(runs: int) -> None:
    work = tempfile.mkdtemp(prefix="edgemesh-measure-")
    shutil.copytree(os.path.join(REPO, "examples", "hello"), os.path.join(work, "hello"))
    with open(os.path.join(work, "psk"), "w") as f:
        f.write("m" * 48)
    builds = []
    if os.path.exists(os.path.join(DIST, "edgemesh")):
        builds.append(Build("onefile", [os.path.join(DIST, "edgemesh")],
                            os.path.join(DIST, "edgemesh")))
    onedir = os.path.join(DIST, "edgemesh-onedir")
    if os.path.exists(onedir):
        builds.append(Build("onedir", [os.path.join(onedir, "edgemesh")], onedir))
    portable = os.path.join(DIST, "edgemesh-linux-amd64-portable")
    mounts: list[str] = []
    if os.path.exists(portable):
        root = os.path.join(work, "root")
        shutil.copytree(portable, root, symlinks=True)
        shutil.copytree(work, os.path.join(root, "work"), ignore=shutil.ignore_patterns("root"))
        for d, args in (("proc", ["-t", "proc", "proc"]), ("dev", ["--bind", "/dev"]),
                        ("tmp", ["-t", "tmpfs", "tmpfs"])):
            os.makedirs(os.path.join(root, d), exist_ok=True)
            subprocess.run(["mount", *args, os.path.join(root, d)], check=True)
            mounts.append(os.path.join(root, d))
        builds.append(Build("portable onedir (own glibc, empty root)",
                            ["/usr/bin/edgemesh"], os.path.join(portable, "usr"), root))
    try:
        tmps = {b.name: tempfile.mkdtemp(prefix="tmp-", dir=work) for b in builds}
        for _ in range(runs):
            for b in builds:
                b.time_version(tmps[b.name])
        print("| build | size | `version` start (median) | idle agent RSS | TMPDIR while running |")
        print("|---|---|---|---|---|")
        for b in builds:
            rss, tmp_bytes = b.idle(tmps[b.name], work)
            print(f"| {b.name} | {b.size / 1e6:.1f} MB | {statistics.median(b.starts):.3f} s "
                  f"| {rss / 1024:.1f} MiB | {tmp_bytes / 1e6:.1f} MB |")
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
