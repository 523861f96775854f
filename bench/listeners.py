"""A loopback agent's service listeners: the manifests that declare them, and the ports it
picked for them, read from ``/debug/proxy``.

The agent in bench.proxy and bench.http runs with ``--no-iptables`` and picks a port per
service; the benches find those ports here before measuring.
"""
from __future__ import annotations

import json
import time
import urllib.request

SERVICE = """apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: bench}}
spec:
  clusterIP: {ip}
  ports: [{{name: {port_name}, port: {port}, targetPort: {target}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: bench
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: {port_name}, port: {target}, protocol: TCP}}]
endpoints: [{{addresses: ["127.0.0.1"]}}]
"""


def service(name: str, ip: str, port: int, target: int, port_name: str = "tcp") -> str:
    """A Service (namespace ``bench``) at ``ip``:``port`` and its EndpointSlice: one
    endpoint, 127.0.0.1:``target``. YAML documents; join several with ``---``."""
    return SERVICE.format(name=name, ip=ip, port=port, target=target, port_name=port_name)


def agent_ports(admin: str, log_path: str, count: int = 2,
                timeout: float = 30.0) -> dict[str, int]:
    """Service name -> listening port once the agent at ``admin`` has ``count`` listeners.

    Exits the bench (naming the agent's log at ``log_path``) if it does not within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{admin}/debug/proxy", timeout=2) as r:
                view = json.load(r)
            found = {lst["service"].split("/")[1]: int(lst["listen"].rsplit(":", 1)[1])
                     for lst in view["listeners"]}
            if len(found) == count:
                return found
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("agent did not come up; log: " + log_path)
