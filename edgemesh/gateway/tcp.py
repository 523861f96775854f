"""Byte splicing for TCP routes and TLS passthrough (upgraded HTTP connections are spliced by
``proxy.http``).

``splice(a, b)`` pumps both directions until both have ended, propagating half-close
(``shutdown(SHUT_WR)`` when one side's reading ends) and closing nothing itself: callers close
both sockets in their ``finally``. An idle timeout bounds a silent connection's life.
"""
from __future__ import annotations

import logging
import socket

from edgemesh.runtime import metrics, tasks

log = logging.getLogger(__name__)

BYTES = metrics.counter("edgemesh_gateway_bytes_total",
                        "Bytes the gateway moved on spliced connections.", ["direction"])
CHUNK = 65536


def _pump(src: socket.socket, dst: socket.socket, pending: bytes, counter: metrics.Counter
          ) -> None:
    total = 0
    try:
        if pending:
            dst.sendall(pending)
            total += len(pending)
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
            total += len(data)
    except (OSError, ValueError):  # reset, timeout, or the other side closed our socket
        pass
    finally:
        counter.inc(total)
        try:
            dst.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):
            pass


def splice(client: socket.socket, upstream: socket.socket, to_upstream: bytes = b"",
           to_client: bytes = b"", idle_timeout: float = 3600.0) -> None:
    """Pump client ⇄ upstream (after sending the pending bytes) until both directions end."""
    client.settimeout(idle_timeout)
    upstream.settimeout(idle_timeout)
    back = tasks.spawn("gateway-splice", _pump, upstream, client, to_client,
                       BYTES.labels("to_client"))
    try:
        _pump(client, upstream, to_upstream, BYTES.labels("to_upstream"))
        back.join()
    finally:
        back.kill(block=False)
