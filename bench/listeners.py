"""Where a loopback agent listens: its services' ports, read from ``/debug/proxy``.

The agent in bench.proxy and bench.http runs with ``--no-iptables`` and picks a port per
service; the benches find those ports here before measuring.
"""
from __future__ import annotations

import json
import time
import urllib.request


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
