"""The front ends the HTTP probes run against, on loopback, each with its own recording backend
and the same routes:

- ``app.example.com``: the ``/admin`` prefix denied with 403, everything else to the backend;
- ``*.example.com``: everything to the backend;
- any other host: 404.

``edgemesh gateway`` gets them as an Istio Gateway and VirtualServices (``directResponse``
403); nginx as ``server_name`` blocks with ``location ^~ /admin { return 403; }``; haproxy as
host ACLs with ``http-request deny deny_status 403 if { path_beg /admin }``. The agent's
per-request proxy has no routes: it serves one Service whose endpoint is the backend.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from tests.probe_runner import Front
from tests.recording_backend import RecordingBackend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NS = "probe"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}; log {log}:\n{_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}; log {log}:\n{_tail(log)}")


def _tail(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-3000:]
    except OSError:
        return ""


@dataclass
class Running:
    """A started front end: the Front to probe, its process, version and config text."""
    front: Front
    proc: subprocess.Popen[bytes]
    version: str
    config: str
    log: str
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stop(self) -> None:
        for p in (self.proc, *self.extra):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.front.backend.stop()

    def log_text(self) -> str:
        """The whole log the front end wrote so far."""
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()


def _service_docs(backend: int) -> list[dict]:
    return [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "app", "namespace": NS},
             "spec": {"clusterIP": "10.96.77.7",
                      "ports": [{"name": "http", "port": 80, "targetPort": backend}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "app-1", "namespace": NS,
                          "labels": {"kubernetes.io/service-name": "app"}},
             "addressType": "IPv4", "ports": [{"name": "http", "port": backend}],
             "endpoints": [{"addresses": ["127.0.0.1"]}]}]


def gateway_manifests(port: int, backend: int) -> list[dict]:
    """Services, Gateway and VirtualServices for the probe routes on ``port``."""
    app = [{"destination": {"host": "app", "port": {"number": 80}}}]
    return _service_docs(backend) + [
        {"apiVersion": "networking.istio.io/v1beta1", "kind": "Gateway",
         "metadata": {"name": "probe", "namespace": NS},
         "spec": {"servers": [{"port": {"number": port, "name": "http", "protocol": "HTTP"},
                               "hosts": ["*"]}]}},
        {"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
         "metadata": {"name": "app", "namespace": NS},
         "spec": {"hosts": ["app.example.com"], "gateways": ["probe"], "http": [
             {"match": [{"uri": {"prefix": "/admin"}}],
              "directResponse": {"status": 403, "body": {"string": "denied\n"}}},
             {"route": app}]}},
        {"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
         "metadata": {"name": "wild", "namespace": NS},
         "spec": {"hosts": ["*.example.com"], "gateways": ["probe"],
                  "http": [{"route": app}]}}]


def _write_docs(path: str, docs: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(d) for d in docs))


def _edgemesh(tmp: str, argv: list[str], name: str) -> tuple[subprocess.Popen[bytes], str]:
    log = os.path.join(tmp, f"{name}.log")
    binary = os.environ.get("EDGEMESH_BIN")
    cmd = [binary] if binary else [sys.executable, "-m", "edgemesh"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd + argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": ROOT})
    return proc, log


def start_gateway(tmp: str) -> Running:
    """``edgemesh gateway`` on loopback with the probe routes."""
    backend = RecordingBackend()
    port = free_port()
    mdir = os.path.join(tmp, "gw-manifests")
    docs = gateway_manifests(port, backend.port)
    _write_docs(os.path.join(mdir, "all.json"), docs)
    config = os.path.join(tmp, "gw.json")
    with open(config, "w", encoding="utf-8") as f:
        json.dump({"kind": "EdgeMeshGateway", "modules": {"edgeTunnel": {"enable": False}}}, f)
    proc, log = _edgemesh(tmp, ["gateway", "--config", config, "--manifests", mdir,
                                "--admin", f"127.0.0.1:{free_port()}", "--nic", "lo",
                                "--include-ip", "127.0.0.1", "--state-dir",
                                os.path.join(tmp, "gw-state"), "--node-name", "probe", "-v", "2"],
                          "gateway")
    wait_port(port, proc, log)
    front = Front("edgemesh-gateway", "127.0.0.1", port, backend, routes=True)
    return Running(front, proc, _edgemesh_version(), "Istio Gateway + VirtualServices: "
                   "app.example.com /admin prefix -> directResponse 403, rest -> app; "
                   "*.example.com -> app", log)


def start_agent(tmp: str) -> Running:
    """``edgemesh agent`` (``perRequestHTTP``, ``--no-iptables``): its listener for the one
    Service ``app`` is the front end."""
    backend = RecordingBackend()
    mdir = os.path.join(tmp, "agent-manifests")
    _write_docs(os.path.join(mdir, "all.json"), _service_docs(backend.port))
    config = os.path.join(tmp, "agent.json")
    with open(config, "w", encoding="utf-8") as f:
        json.dump({"modules": {"edgeDNS": {"enable": False}, "edgeTunnel": {"enable": False},
                               "edgeProxy": {"perRequestHTTP": True}},
                   "commonConfig": {"stateDir": os.path.join(tmp, "agent-state")}}, f)
    admin = f"127.0.0.1:{free_port()}"
    proc, log = _edgemesh(tmp, ["agent", "--config", config, "--manifests", mdir,
                                "--no-iptables", "--admin", admin, "--node-name", "probe",
                                "-v", "2"], "agent")
    port = _agent_port(admin, proc, log)
    wait_port(port, proc, log)
    front = Front("edgemesh-proxy", "127.0.0.1", port, backend, routes=False)
    return Running(front, proc, _edgemesh_version(), "agent perRequestHTTP: true, Service "
                   "probe/app (port name http) -> backend", log)


def _agent_port(admin: str, proc: subprocess.Popen[bytes], log: str) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"http://{admin}/debug/proxy", timeout=2) as r:
                view = json.load(r)
            for lst in view["listeners"]:
                if lst["service"].startswith(f"{NS}/app"):
                    return int(lst["listen"].rsplit(":", 1)[1])
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"agent listener not found:\n{_tail(log)}")


def _edgemesh_version() -> str:
    from edgemesh import __version__
    return f"edgemesh {__version__}"


NGINX = """user root;
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.err info;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  upstream app {{ server 127.0.0.1:{backend}; keepalive 16; }}
  server {{ listen 127.0.0.1:{port} default_server; return 404; }}
  server {{
    listen 127.0.0.1:{port};
    server_name app.example.com;
    location ^~ /admin {{ return 403; }}
    location / {{ proxy_pass http://app; proxy_http_version 1.1;
                 proxy_set_header Connection ""; proxy_set_header Host $host; }}
  }}
  server {{
    listen 127.0.0.1:{port};
    server_name *.example.com;
    location / {{ proxy_pass http://app; proxy_http_version 1.1;
                 proxy_set_header Connection ""; proxy_set_header Host $host; }}
  }}
}}
"""

HAPROXY = """global
  nbthread 1
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  timeout http-request 10s
frontend fe
  bind 127.0.0.1:{port}
  acl app req.hdr(host),lower,field(1,:) -m str app.example.com
  acl wild req.hdr(host),lower,field(1,:) -m end .example.com
  http-request deny deny_status 403 if app {{ path_beg /admin }}
  http-request return status 404 if !app !wild
  default_backend be
backend be
  server s1 127.0.0.1:{backend}
"""


def _version(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).strip().splitlines()[0]


def start_nginx(tmp: str) -> Running:
    """nginx as a reverse proxy with the probe routes."""
    backend = RecordingBackend()
    port = free_port()
    conf_text = NGINX.format(tmp=tmp, port=port, backend=backend.port)
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w", encoding="utf-8") as f:
        f.write(conf_text)
    log = os.path.join(tmp, "nginx.err")
    proc = subprocess.Popen(["nginx", "-c", conf, "-p", tmp, "-e", log],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc, log)
    front = Front("nginx", "127.0.0.1", port, backend, routes=True)
    return Running(front, proc, _version(["nginx", "-v"]), conf_text, log)


def start_haproxy(tmp: str) -> Running:
    """haproxy (mode http) with the probe routes."""
    backend = RecordingBackend()
    port = free_port()
    conf_text = HAPROXY.format(port=port, backend=backend.port)
    conf = os.path.join(tmp, "haproxy.cfg")
    with open(conf, "w", encoding="utf-8") as f:
        f.write(conf_text)
    log = os.path.join(tmp, "haproxy.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(["haproxy", "-db", "-f", conf], stdout=out,
                                stderr=subprocess.STDOUT)
    wait_port(port, proc, log)
    front = Front("haproxy", "127.0.0.1", port, backend, routes=True)
    return Running(front, proc, _version(["haproxy", "-v"]), conf_text, log)


STARTERS = {"edgemesh-gateway": start_gateway, "edgemesh-proxy": start_agent,
            "nginx": start_nginx, "haproxy": start_haproxy}


def available(name: str) -> bool:
    """Whether the peer tool ``name`` is installed (edgemesh always is)."""
    return name.startswith("edgemesh") or shutil.which(name) is not None
