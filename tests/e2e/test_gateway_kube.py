"""A real ``edgemesh gateway --master`` against tests/kubeapi.py with the gateway's RBAC: Secrets
readable per namespace only (a cluster-wide Secret list is 403, as on a cluster with
build/gateway/rbac.yaml). The gateway terminates TLS with Secrets from the namespaces of its
Gateways, never asks for Secrets cluster-wide or in a namespace without a Gateway, and stops
watching (and forgets) a namespace's Secrets when its Gateway goes.

The gateway listens on 127.0.0.1 only (``--nic lo --include-ip 127.0.0.1/32``) with the tunnel
off, so the test needs no root and touches no network but loopback.
"""
from __future__ import annotations

import base64
import os
import subprocess

import pytest

from tests import kubeapi
from tests.kubeapi import KubeAPI
from tests.netlab import wait_for
from tests.procs import Proc, debug_view, free_port, wait_ready

CONFIG = """\
kind: EdgeMeshGateway
kubeAPIConfig:
  resyncBackoffMaxSeconds: 1.0
modules:
  edgeTunnel: {enable: false}
  edgeGateway: {interfaceResync: 1.0}
"""


def _cert(tmp_path, host: str) -> tuple[str, bytes, bytes]:
    """A self-signed certificate for ``host``: (path of the cert, cert PEM, key PEM)."""
    crt, key = tmp_path / f"{host}.crt", tmp_path / f"{host}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj", f"/CN={host}",
                    "-addext", f"subjectAltName=DNS:{host}", "-keyout", str(key),
                    "-out", str(crt)], check=True, capture_output=True)
    return str(crt), crt.read_bytes(), key.read_bytes()


def _secret(name: str, ns: str, cert: bytes, key: bytes) -> dict:
    return {"metadata": {"name": name, "namespace": ns}, "type": "kubernetes.io/tls",
            "data": {"tls.crt": base64.b64encode(cert).decode(),
                     "tls.key": base64.b64encode(key).decode()}}


def _route(ns: str, gateway: str, service: str) -> dict:
    return {"metadata": {"name": f"{service}-route", "namespace": ns},
            "spec": {"hosts": ["*"], "gateways": [gateway],
                     "http": [{"route": [{"destination": {"host": service,
                                                          "port": {"number": 80}}}]}]}}


def _curl(host: str, port: int, cacert: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", cacert, "--resolve",
                           f"{host}:{port}:127.0.0.1", f"https://{host}:{port}/"],
                          capture_output=True, text=True)


@pytest.fixture
def backend(tmp_path):
    """An HTTP server on 127.0.0.1 answering every path with its own text."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("served behind the gateway")
    port = free_port()
    p = subprocess.Popen(["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1",
                          "--directory", str(www)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    yield port
    p.terminate()
    p.wait(timeout=10)


def test_gateway_reads_secrets_only_in_its_gateways_namespaces(tmp_path, backend):
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    admin = f"127.0.0.1:{free_port()}"
    ports = {"shop": free_port(), "blog": free_port()}
    certs = {ns: _cert(tmp_path, f"{ns}.example.com") for ns in ("shop", "blog", "third")}
    with KubeAPI() as api:  # cluster-wide Secret requests get 403
        kubeapi.cluster(api, services=0)
        for ns, (_, cert, key) in certs.items():
            api.put("namespaces", kubeapi.namespace(ns))
            api.put("secrets", _secret(f"{ns}-cert", ns, cert, key))
            api.put("services", kubeapi.service("web", ns, ip=f"10.96.3.{len(ns)}",
                                                target=backend))
            api.put("endpointslices", kubeapi.endpoint_slice("web", ["127.0.0.1"], ns,
                                                             port=backend, node="gw"))
        for ns in ("shop", "blog"):
            api.put("gateways", kubeapi.gateway(f"{ns}-gw", ns, credential=f"{ns}-cert",
                                                port=ports[ns]))
            api.put("virtualservices", _route(ns, f"{ns}-gw", "web"))
        args = ["gateway", "--config", str(config), "--master", api.url, "--nic", "lo",
                "--include-ip", "127.0.0.1/32", "--admin", admin, "--node-name", "gw",
                "--state-dir", str(tmp_path / "state")]
        with Proc(args) as gw:
            try:
                wait_ready(gw, admin)
                for ns in ("shop", "blog"):
                    wait_for(lambda ns=ns: _curl(f"{ns}.example.com", ports[ns],
                                                 certs[ns][0]).stdout ==
                             "served behind the gateway", timeout=15,
                             what=f"HTTPS with {ns}'s Secret")
                assert {r.namespace for r in api.requests_for("secrets")} == {"shop", "blog"}

                api.delete("gateways", "blog", "blog-gw")
                wait_for(lambda: sorted(debug_view(admin, "meta")["secretNamespaces"]) ==
                         ["shop"], timeout=15, what="blog's Secret watch stopped")
                wait_for(lambda: not api.watching_in("secrets", "blog"), timeout=10,
                         what="blog's watch closed")
                assert _curl("blog.example.com", ports["blog"], certs["blog"][0]).returncode
                assert _curl("shop.example.com", ports["shop"], certs["shop"][0]).stdout == \
                    "served behind the gateway"
                assert api.requests_for("secrets", namespace="") == []
                assert api.requests_for("secrets", namespace="third") == []
            finally:
                if os.environ.get("EDGEMESH_TEST_LOGS"):
                    print(gw.log())
