"""Byte pumping for TCP routes and TLS passthrough (upgraded HTTP connections are pumped by
``proxy.http_greenlet``, with the same pump).

``splice(a, b)`` pumps both directions (``runtime.pump.both_ways``: in the kernel where
neither side is TLS) until both have ended, propagating half-close and closing nothing itself:
callers close both sockets in their ``finally``. An idle timeout bounds a silent direction.
"""
from __future__ import annotations

import socket

from edgemesh.runtime import metrics, pump

BYTES = metrics.counter("edgemesh_gateway_bytes_total",
                        "Bytes the gateway moved on spliced connections.", ["direction"])


def splice(client: socket.socket, upstream: socket.socket, to_upstream: bytes = b"",
           to_client: bytes = b"", idle_timeout: float = 3600.0) -> None:
    """Pump client ⇄ upstream (after sending the pending bytes) until both directions end."""
    pump.both_ways(client, upstream, to_upstream, to_client, idle_timeout,
                   BYTES.labels("to_upstream").inc, BYTES.labels("to_client").inc)
