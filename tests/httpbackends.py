"""Test endpoints for the HTTP layer: an h11 server (the reference parser on the far side) that
says who it is and what it received, with a WebSocket echo on ``/ws`` (wsproto)."""
from __future__ import annotations

import hashlib
import json
import socket
from urllib.parse import parse_qs, urlsplit

import h11
import wsproto
import wsproto.events as ws
from gevent.server import StreamServer

from edgemesh.meta.store import Backend


class EchoBackend:
    """An endpoint named ``name``; ``GET /?size=N`` returns N bytes, ``/ws`` echoes WebSocket
    messages, ``/slow`` never answers, ``/close`` answers with a close-delimited body; every
    other request gets JSON describing it (method, target, headers, body length and sha256)."""

    def __init__(self, name: str, host: str = "127.0.0.1", idle_close: float | None = None,
                 port: int = 0):
        self.name = name
        self.connections = 0
        self.requests = 0
        self.idle_close = idle_close
        self.server = StreamServer((host, port), self._handle)
        self.server.start()

    @property
    def backend(self) -> Backend:
        return Backend(self.server.server_host, self.server.server_port)

    def stop(self) -> None:
        self.server.stop(timeout=1)

    def _handle(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        sock.settimeout(self.idle_close or 30)
        try:
            while self._one_request(sock, conn):
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError):
            pass
        finally:
            sock.close()

    def _next(self, sock: socket.socket, conn: h11.Connection):  # type: ignore[no-untyped-def]
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    sock.sendall(conn.send(h11.InformationalResponse(status_code=100,
                                                                     headers=[])))
                conn.receive_data(sock.recv(65536))
                continue
            return event

    def _one_request(self, sock: socket.socket, conn: h11.Connection) -> bool:
        request = self._next(sock, conn)
        if not isinstance(request, h11.Request):
            return False
        self.requests += 1
        target = request.target.decode()
        if target == "/ws":
            self._websocket(sock, request)
            return False
        if target == "/slow":
            sock.recv(1)
            return False
        digest, size = hashlib.sha256(), 0
        while True:
            event = self._next(sock, conn)
            if isinstance(event, h11.Data):
                digest.update(event.data)
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return False
        query = parse_qs(urlsplit(target).query)
        if "size" in query:
            body = bytes(i % 251 for i in range(int(query["size"][0])))
            headers = [("Content-Type", "application/octet-stream")]
        else:
            body = json.dumps({"name": self.name, "method": request.method.decode(),
                               "target": target, "size": size, "sha256": digest.hexdigest(),
                               "headers": [[n.decode(), v.decode()] for n, v in
                                           request.headers]}).encode()
            headers = [("Content-Type", "application/json")]
        if target == "/close":
            sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
            return False
        if "chunked" in query:
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            headers.append(("Content-Length", str(len(body))))
        headers.append(("X-Backend", self.name))
        sock.sendall(conn.send(h11.Response(status_code=200, headers=headers)))
        if request.method != b"HEAD":
            for i in range(0, len(body), 100000):
                sock.sendall(conn.send(h11.Data(data=body[i:i + 100000])))
        sock.sendall(conn.send(h11.EndOfMessage()))
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    def _websocket(self, sock: socket.socket, request: h11.Request) -> None:
        server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        raw = b"GET /ws HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n"
                                                 for n, v in request.headers) + b"\r\n"
        server.receive_data(raw)
        for event in server.events():
            if isinstance(event, ws.Request):
                sock.sendall(server.send(ws.AcceptConnection()))
        while True:
            data = sock.recv(65536)
            if not data:
                return
            server.receive_data(data)
            for event in server.events():
                if isinstance(event, ws.TextMessage):
                    sock.sendall(server.send(ws.Message(data=f"{self.name}:{event.data}")))
                elif isinstance(event, ws.BytesMessage):
                    sock.sendall(server.send(ws.Message(data=bytes(event.data)[::-1])))
                elif isinstance(event, ws.CloseConnection):
                    sock.sendall(server.send(event.response()))
                    return


def main() -> None:
    """``python -m tests.httpbackends NAME HOST PORT``: one EchoBackend, forever (e2e pods)."""
    import sys

    import gevent

    name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    EchoBackend(name, host, port=port)
    gevent.wait()


if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()
    main()
