"""Shared pieces of the mesh end-to-end tests (tunnel, gateway through NAT): manifests for
services whose pods live on lo addresses of one node, the relay server and agent command lines,
a raw TCP client, reading one metric from Prometheus text, and writing a file into a
test's directory.

Not a test module: test_tunnel.py, test_gateway_nat.py and test_nat_matrix.py build their labs
from these.
"""
from __future__ import annotations

import os
import textwrap

from tests import netlab
from tests.procs import Proc

SERVER_PORT = 20004

TCP_CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=15)
    s.sendall(b"ping over the tunnel"); s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536): data += chunk
    print(data.decode())
""")


def service(name: str, ip: str, port: int, target: int, node: str, pod: str,
            proto: str = "TCP", port_name: str = "tcp", namespace: str = "default") -> list[dict]:
    """A Service and its EndpointSlice: one endpoint ``pod``:``target`` on ``node``."""
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": namespace},
         "spec": {"clusterIP": ip, "ports": [{"name": port_name, "port": port,
                                              "targetPort": target, "protocol": proto}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-1", "namespace": namespace,
                      "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4",
         "ports": [{"name": port_name, "port": target, "protocol": proto}],
         "endpoints": [{"addresses": [pod], "nodeName": node}]}]


def nodes(addresses: dict[str, str]) -> list[dict]:
    """Node objects with one InternalIP each (what agents try first for a direct path)."""
    return [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": n},
             "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}
            for n, ip in addresses.items()]


def server(ns: netlab.Netns, tmp: str, psk: str, admin: str, config: str | None = None,
           port: int = SERVER_PORT) -> Proc:
    """``edgemesh server`` (rendezvous and relay) listening on ``port`` in ``ns``."""
    args = ["server", "--listen", f"0.0.0.0:{port}", "--psk-file", psk,
            "--state-dir", os.path.join(tmp, "state-srv"), "--admin", admin]
    if config:
        args += ["--config", config]
    return Proc(args, ns=ns)


def mesh_args(node: str, server_addr: str, psk: str, state_dir: str, admin: str,
              manifests: list[str]) -> list[str]:
    """The flags an agent or gateway needs to join the mesh (after the subcommand)."""
    args = ["--node-name", node, "--admin", admin, "--server", server_addr,
            "--psk-file", psk, "--state-dir", state_dir]
    for m in manifests:
        args += ["--manifests", m]
    return args


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples in Prometheus text whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def write(directory: str, name: str, text: str) -> str:
    """Write ``text`` to ``directory``/``name`` (its parent must exist); the file's path."""
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    return path
