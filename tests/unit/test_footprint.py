"""Idle footprint (issue 9): what an agent with DNS, proxy and tunnel loads, and what it must not.

Behavioural, never byte-exact: the agent runs as a real process (source tree, or
``$EDGEMESH_BIN``) with every example loaded, and ``/debug/runtime`` says which modules it
imported. ``python -m bench.binary`` prints the RSS numbers.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from edgemesh.runtime.admin import BadRequest, parse_request_head, render_response
from tests.procs import ROOT, Proc, debug_view, free_port, wait_ready

# Needed only by the kube source (requests: https, auth), the gateway's TLS (ssl, pyOpenSSL),
# the tunnel's first handshake (cryptography: ~7 MB with its Rust module) or
# gevent's plugin lookup, which the CLI skips; each costs 1-5 MB of RSS when loaded.
NOT_ON_THE_IDLE_PATH = ("requests", "urllib3", "charset_normalizer", "idna", "certifi",
                        "OpenSSL", "ssl", "_ssl", "http.client", "email", "email.parser",
                        "importlib.metadata", "zipfile", "csv", "gevent.pywsgi",
                        "cryptography", "cryptography.hazmat.bindings._rust")


@pytest.fixture(scope="module")
def idle_agent(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("footprint")
    psk = tmp / "psk"
    psk.write_text(os.urandom(24).hex())
    psk.chmod(0o600)
    config = tmp / "agent.yaml"
    config.write_text(
        f"modules:\n"
        f"  edgeDNS: {{listenAddress: 127.0.0.1, listenPort: {free_port()},\n"
        f"             cacheDNS: {{upstreamServers: ['127.0.0.1:{free_port()}']}}}}\n"
        f"  edgeProxy: {{iptables: false, listenAddress: 127.0.0.1}}\n"
        f"  edgeTunnel: {{listenAddress: 127.0.0.1, listenPort: {free_port()},\n"
        f"               psk: {{path: '{psk}'}}}}\n")
    admin = f"127.0.0.1:{free_port()}"
    with Proc(["agent", "--config", str(config), "--manifests", "examples",
               "--no-iptables", "--admin", admin, "--state-dir", str(tmp / "state"),
               "--node-name", "edge-node-1"]) as agent:
        wait_ready(agent, admin)
        yield agent, admin


def test_idle_agent_loads_no_heavy_module(idle_agent) -> None:
    agent, admin = idle_agent
    view = debug_view(admin, "runtime")
    loaded = set(view["modules"])
    # the three modules really run (so an empty or broken view cannot pass)
    assert {"edgemesh.dns.module", "edgemesh.proxy.module", "edgemesh.tunnel.module",
            "edgemesh.tunnel.x25519", "gevent.server"} <= loaded, agent.log()
    assert sorted(loaded.intersection(NOT_ON_THE_IDLE_PATH)) == []
    assert view["modules_loaded"] == len(loaded)
    assert view["rss_bytes"] >= view["rss_anon_bytes"] > 0
    assert view["greenlets"] > 0 and view["threads"] >= 1


def test_admin_answers_head_and_rejects_garbage(idle_agent) -> None:
    _, admin = idle_agent
    host, port = admin.rsplit(":", 1)

    def exchange(request: bytes) -> bytes:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(request)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    head = exchange(b"HEAD /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 3\r\n" in head
    assert head.endswith(b"\r\n\r\n")  # no body after the head
    assert exchange(b"GET /livez?x=1 HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\nok\n")
    assert exchange(b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert exchange(b"GET /" + b"a" * 9000).startswith(b"HTTP/1.1 400 ")


def test_request_head_parsing() -> None:
    assert parse_request_head(b"GET /debug/node?x=1 HTTP/1.1\r\nHost: a\r\n\r\n") == \
        ("GET", "/debug/node")
    assert parse_request_head(b"HEAD /debug/a%20b HTTP/1.0\r\n\r\n") == ("HEAD", "/debug/a b")
    for bad in (b"GET / HTTP/2\r\n\r\n", b"GET http://x/ HTTP/1.1\r\n\r\n", b"GET /\r\n\r\n",
                b"GET /\xff HTTP/1.1\r\n\r\n", b"\r\n\r\n"):
        with pytest.raises(BadRequest):
            parse_request_head(bad)
    assert render_response("200 OK", [("Content-Length", "9")], b"ok", False) == \
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"


def test_ssl_is_patched_on_its_first_import() -> None:
    """The CLI's patching leaves ssl unimported; whoever imports it gets gevent's version."""
    code = ("import sys\n"
            "from edgemesh.runtime import patching\n"
            "patching.patch_all()\n"
            "assert 'ssl' not in sys.modules and 'importlib.metadata' not in sys.modules\n"
            "from gevent import monkey\n"
            "assert monkey.is_module_patched('socket') and monkey.is_module_patched('threading')\n"
            "from ssl import SSLContext\n"
            "import gevent.ssl, ssl, http.client\n"
            "assert SSLContext is gevent.ssl.SSLContext is ssl.SSLContext\n"
            "assert monkey.is_module_patched('ssl')\n"
            "assert http.client.ssl.SSLContext is gevent.ssl.SSLContext\n"
            "assert 'importlib.metadata' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no gevent warning about patching ssl late
