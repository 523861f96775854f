"""The admin HTTP endpoint: /livez, /readyz, /metrics and /debug/<name> (JSON).

Parts register readiness checks (a function returning "" when ready, else why not) and debug
views (a function returning JSON-able data). ``edgemesh status`` reads the debug views.

The server is a small HTTP/1.x responder (GET/HEAD, one request per connection) rather than
gevent.pywsgi: pywsgi imports http.client, which imports email.* and ssl (~5 MB RSS in an
idle agent that otherwise never loads them; see tests/unit/test_footprint.py).
"""
from __future__ import annotations

import json
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from gevent.pool import Pool
from gevent.server import StreamServer

from edgemesh.config import split_host_port
from edgemesh.errors import RemoteProtocolError
from edgemesh.runtime import metrics

log = logging.getLogger(__name__)

MAX_HEAD = 8192  # bytes of request line + headers
IO_TIMEOUT = 5.0  # seconds for a client to send its request and take the answer
CONNECTIONS = 16  # served at once; more wait in the listen backlog

Check = Callable[[], str]
View = Callable[[], Any]


class Admin:
    def __init__(self) -> None:
        self._checks: dict[str, tuple[Check, Check | None]] = {}
        self.views: dict[str, View] = {}
        self._server: StreamServer | None = None

    def add_check(self, name: str, check: Check, note: Check | None = None) -> None:
        """``check()`` returns "" when ready, else why not; ``note()``, when given, says how
        a passing check passes (``[+] apiserver (serving cached metadata: ...) ok``)."""
        self._checks[name] = (check, note)

    def remove_check(self, name: str) -> None:
        self._checks.pop(name, None)

    def ready_lines(self) -> list[str]:
        """What ``/readyz`` lists when every check passes, one line per check."""
        lines = []
        for name in sorted(self._checks):
            note = self._call(self._checks[name][1]) if self._checks[name][1] else ""
            lines.append(f"[+] {name} ({note}) ok" if note else f"[+] {name} ok")
        return lines

    @staticmethod
    def _call(fn: Check | None) -> str:
        try:
            return fn() if fn is not None else ""
        except Exception as e:  # a broken check reports as not ready, never crashes
            return f"check failed: {e}"

    def add_view(self, name: str, view: View) -> None:
        self.views[name] = view

    def not_ready(self) -> dict[str, str]:
        """Every check that fails, with its reason."""
        out = {}
        for name, (check, _) in self._checks.items():
            reason = self._call(check)
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
            body = "".join(line + "\n" for line in self.ready_lines()) + "ok\n"
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
        self._server = StreamServer((host, port), self._serve, spawn=Pool(CONNECTIONS))
        self._server.start()
        host, port = self._server.address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=1)

    def _serve(self, sock: socket.socket, _peer: Any) -> None:
        """One request per connection: read the head, answer through ``app``, close."""
        sock.settimeout(IO_TIMEOUT)
        try:
            try:
                method, path = parse_request_head(_read_head(sock))
            except BadRequest as e:
                sock.sendall(render_response("400 Bad Request", [], f"{e}\n".encode(), True))
                return
            out: dict[str, Any] = {}

            def start(status: str, headers: list[tuple[str, str]]) -> None:
                out["status"], out["headers"] = status, headers
            body = b"".join(self.app({"REQUEST_METHOD": method, "PATH_INFO": path}, start))
            sock.sendall(render_response(out["status"], out["headers"], body,
                                         method != "HEAD"))
            _linger(sock)
        except OSError:
            pass  # the client went away or stalled past IO_TIMEOUT: nothing to answer
        finally:
            sock.close()


def runtime_view() -> dict[str, Any]:
    """The process's footprint (``/debug/runtime``): RSS (total and anonymous, from
    /proc/self/status), the loaded modules and the live greenlets."""
    import gc

    from greenlet import greenlet

    status = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            status = {k: v.split()[0] for k, _, v in (line.partition(":") for line in f)
                      if k in ("VmRSS", "RssAnon", "RssFile", "Threads")}
    except OSError:  # not Linux: leave the numbers out
        pass
    return {"rss_bytes": int(status.get("VmRSS", 0)) * 1024,
            "rss_anon_bytes": int(status.get("RssAnon", 0)) * 1024,
            "rss_file_bytes": int(status.get("RssFile", 0)) * 1024,
            "threads": int(status.get("Threads", 0)),
            "greenlets": sum(1 for o in gc.get_objects() if isinstance(o, greenlet) and o),
            "modules_loaded": len(sys.modules),
            "modules": sorted(sys.modules)}


class BadRequest(RemoteProtocolError):
    """The bytes received are not an HTTP/1.x request head (answered with 400)."""


def parse_request_head(head: bytes) -> tuple[str, str]:
    """(method, path without query, percent-decoded) of a request head ending in CRLFCRLF."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
        raise BadRequest("malformed request line")
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("non-ASCII request line") from None
    return method, unquote(target.split("?", 1)[0])


def render_response(status: str, headers: list[tuple[str, str]], body: bytes,
                    with_body: bool) -> bytes:
    """The response bytes; ``Content-Length`` is the body's even when it is left out (HEAD)."""
    fields = [(k, v) for k, v in headers if k.lower() not in ("content-length", "connection")]
    fields += [("Content-Length", str(len(body))), ("Connection", "close")]
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n"
    return head.encode("latin-1") + (body if with_body else b"")


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            raise BadRequest("request head too large")
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError("closed before the end of the request head")
        data += chunk
    return data


def _linger(sock: socket.socket) -> None:
    """Half-close, then drain what the client still sends (a POST body), bounded: closing with
    unread bytes would reset the connection and could destroy the answer in flight."""
    sock.shutdown(socket.SHUT_WR)
    drained = 0
    while drained < 65536:
        chunk = sock.recv(4096)
        if not chunk:
            return
        drained += len(chunk)


def _reply(start: Callable[..., Any], status: str, body: bytes,
           ctype: str = "text/plain; charset=utf-8") -> list[bytes]:
    start(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


def _json(start: Callable[..., Any], data: Any) -> list[bytes]:
    body = (json.dumps(data, indent=1, sort_keys=True, default=str) + "\n").encode()
    return _reply(start, "200 OK", body, "application/json")
