"""The admin HTTP endpoint: /livez, /readyz, /metrics and /debug/<name> (JSON).

Parts register readiness checks (a function returning "" when ready, else why not) and debug
views (a function returning JSON-able data). ``edgemesh status`` reads the debug views.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from gevent import pywsgi

from edgemesh.config import split_host_port
from edgemesh.runtime import metrics

log = logging.getLogger(__name__)

Check = Callable[[], str]
View = Callable[[], Any]


class Admin:
    def __init__(self) -> None:
        self.checks: dict[str, Check] = {}
        self.views: dict[str, View] = {}
        self._server: pywsgi.WSGIServer | None = None

    def add_check(self, name: str, check: Check) -> None:
        self.checks[name] = check

    def add_view(self, name: str, view: View) -> None:
        self.views[name] = view

    def not_ready(self) -> dict[str, str]:
        """Every check that fails, with its reason."""
        out = {}
        for name, check in self.checks.items():
            try:
                reason = check()
            except Exception as e:  # a broken check reports as not ready, never crashes
                reason = f"check failed: {e}"
            if reason:
                out[name] = reason
        return out

    def app(self, environ: dict[str, Any], start: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _reply(start, "405 Method Not Allowed", b"method not allowed\n")
        if path == "/livez":
            return _reply(start, "200 OK", b"ok\n")
        if path == "/readyz":
            problems = self.not_ready()
            if problems:
                body = "".join(f"[-] {k}: {v}\n" for k, v in sorted(problems.items()))
                return _reply(start, "503 Service Unavailable", body.encode())
            body = "".join(f"[+] {k} ok\n" for k in sorted(self.checks)) + "ok\n"
            return _reply(start, "200 OK", body.encode())
        if path == "/metrics":
            return _reply(start, "200 OK", metrics.REGISTRY.render().encode(),
                          "text/plain; version=0.0.4; charset=utf-8")
        if path in ("/debug", "/debug/"):
            return _json(start, sorted(self.views))
        if path.startswith("/debug/") and path[7:] in self.views:
            try:
                data = self.views[path[7:]]()
            except Exception as e:  # a broken view answers 500; the endpoint keeps serving
                log.exception("debug view %s failed", path[7:])
                return _reply(start, "500 Internal Server Error", f"view failed: {e}\n".encode())
            return _json(start, data)
        return _reply(start, "404 Not Found", b"not found\n")

    def start(self, address: str) -> tuple[str, int]:
        host, port = split_host_port(address)
        self._server = pywsgi.WSGIServer((host, port), self.app, log=None,
                                         error_log=log, spawn=16)
        self._server.start()
        return self._server.address[:2]

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=1)


def _reply(start: Callable[..., Any], status: str, body: bytes,
           ctype: str = "text/plain; charset=utf-8") -> list[bytes]:
    start(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


def _json(start: Callable[..., Any], data: Any) -> list[bytes]:
    body = (json.dumps(data, indent=1, sort_keys=True, default=str) + "\n").encode()
    return _reply(start, "200 OK", body, "application/json")
