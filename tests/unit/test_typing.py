"""The protocol cores (sans-IO: no sockets, no gevent) type-check with mypy, as STYLE asks."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROTOCOL_CORES = [
    "edgemesh/config.py",
    "edgemesh/config_go.py",
    "edgemesh/meta/",
    "edgemesh/dns/zone.py",
    "edgemesh/dns/records.py",
    "edgemesh/netlink.py",
    "edgemesh/dns/wire.py",
    "edgemesh/tunnel/frames.py",
    "edgemesh/tunnel/handshake.py",
    "edgemesh/tunnel/punch.py",
    "edgemesh/tunnel/control.py",
    "edgemesh/proxy/lb.py",
    "edgemesh/proxy/http_head.py",
    "edgemesh/proxy/http_body.py",
    "edgemesh/proxy/http_router.py",
    "edgemesh/proxy/http_exchange.py",
    "edgemesh/proxy/http_target.py",
    "edgemesh/proxy/tls_sni.py",
    "edgemesh/proxy/steering.py",
    "edgemesh/proxy/podmap.py",
    "edgemesh/proxy/meshcidr.py",
    "edgemesh/tunnel/policy.py",
    "edgemesh/gateway/routes.py",
    "edgemesh/gateway/compile.py",
    "edgemesh/gateway/linear_re.py",
    "edgemesh/gateway/ciphers.py",
    "edgemesh/runtime/backoff.py",
    "edgemesh/doc_limits.py",
]


@pytest.mark.skipif(shutil.which("mypy", path=os.path.dirname(sys.executable)) is None,
                    reason="mypy is not installed (make setup installs it)")
def test_protocol_cores_type_check() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", *PROTOCOL_CORES], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
