"""The demo's Pods: tiny servers that say who answered, bound to a Pod IP inside a node.

    python -m examples.demo.pods http POD_IP PORT NAME   # "hello from pod NAME on node NODE"
    python -m examples.demo.pods ws POD_IP PORT NAME     # WebSocket echo: "NAME echoes: MSG"

(The TCP and UDP echo Pods are plain socat; see world.py.) ``NODE`` comes from $NODE_NAME.
"""
from __future__ import annotations

import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve_http(ip: str, port: int, pod: str) -> None:
    """Answer every GET with one line naming the Pod, its node and the request's path."""
    node = os.environ.get("NODE_NAME", "?")

    class Hello(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            body = f"hello from pod {pod} on node {node} (path {self.path})\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    ThreadingHTTPServer((ip, port), Hello).serve_forever()


def serve_ws(ip: str, port: int, pod: str) -> None:
    """Echo every WebSocket message, prefixed with the Pod's name."""
    from websockets.sync.server import ServerConnection, serve

    def echo(ws: ServerConnection) -> None:
        for message in ws:
            ws.send(f"{pod} echoes: {message!s}")

    with serve(echo, ip, port) as server:
        server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] not in ("http", "ws"):
        print(__doc__, file=sys.stderr)
        return 2
    kind, ip, port, pod = argv
    (serve_http if kind == "http" else serve_ws)(ip, int(port), pod)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
