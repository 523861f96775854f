"""Run edgemesh as users do: a real process (source tree, or the frozen binary if
``EDGEMESH_BIN`` names one), with its log kept for the failure message."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

from tests.netlab import Netns, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def edgemesh_argv() -> list[str]:
    binary = os.environ.get("EDGEMESH_BIN")
    return [binary] if binary else [sys.executable, "-m", "edgemesh"]


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port free for both TCP and UDP on ``host``, below the ephemeral range.

    Ports the kernel hands out to outgoing connections (32768-60999) would race with the
    many client sockets other tests open, so pick from 20000-32000 and check both protocols.
    """
    del kind  # both protocols are always checked
    for _ in range(200):
        port = random.randint(20000, 32000)
        try:
            for proto in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, proto) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free port on {host}")


class Proc:
    """A running edgemesh command; ``log()`` returns what it wrote to stderr so far."""

    def __init__(self, args: list[str], ns: Netns | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.logfile = tempfile.NamedTemporaryFile(prefix="edgemesh-", suffix=".log",
                                                   delete=False)
        argv = edgemesh_argv() + args
        full_env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
        if ns is not None:
            argv = ["ip", "netns", "exec", ns.name, *argv]
        self.popen = subprocess.Popen(argv, stdout=self.logfile, stderr=subprocess.STDOUT,
                                      env=full_env, cwd=ROOT)
        if ns is not None:
            ns.procs.append(self.popen)

    def log(self) -> str:
        with open(self.logfile.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def __enter__(self) -> "Proc":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        os.unlink(self.logfile.name)


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_ready(proc: Proc, admin: str, ns: Netns | None = None, timeout: float = 20.0) -> None:
    """Wait until the process's /readyz says ok (in ``ns`` when given)."""
    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"edgemesh exited ({proc.popen.returncode}):\n{proc.log()}")
        if ns is None:
            return http_get(f"http://{admin}/readyz")[0] == 200
        r = ns.run("curl", "-sf", f"http://{admin}/readyz", check=False)
        return r.returncode == 0
    try:
        wait_for(ready, timeout=timeout, what=f"{admin}/readyz")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n--- log ---\n{proc.log()}") from None


def debug_view(admin: str, view: str) -> Any:
    return json.loads(http_get(f"http://{admin}/debug/{view}")[1])


def settle(seconds: float) -> None:
    time.sleep(seconds)
