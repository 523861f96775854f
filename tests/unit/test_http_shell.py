"""The per-request HTTP shell on loopback: real sockets, real clients (requests, curl,
websockets), h11 endpoints behind it (tests/httpbackends.py). Every case runs down both
execution paths of the engine: the callback fast path (``fast=True``) and the greenlet path
alone (``fast=False``, as the gateway's TLS connections run)."""
from __future__ import annotations

import hashlib
import json
import logging
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator

import gevent
import h11
import pytest
import requests
from gevent.server import StreamServer
from websockets.sync.client import connect as ws_connect

from edgemesh.dialer import Dialer
from edgemesh.meta.istio import HttpCookie
from edgemesh.meta.store import Backend
from edgemesh.proxy.http import MALFORMED, serve_connection
from edgemesh.proxy.http_body import BodyTracker
from edgemesh.proxy.http_head import (
    Framing,
    HeadError,
    HeadLimits,
    RequestHead,
    parse_request_head,
)
from edgemesh.proxy.http_listen import REQUESTS, HttpPort
from edgemesh.proxy.http_pool import UpstreamPool
from edgemesh.proxy.http_router import Forward, HttpLimits, Reply
from edgemesh.proxy.httpflow import MEMO_ENTRIES, _Memo
from edgemesh.proxy.lb import Balancer, HashKey, LBSpec, Policy
from tests.httpbackends import EchoBackend
from tests.procs import free_port


class Proxy:
    """serve_connection behind a StreamServer, as the proxy module runs it."""
    fast = True  # set per test by the ``fast`` fixture

    def __init__(self, backends: list[Backend], spec: LBSpec = LBSpec(),
                 cookie: HttpCookie | None = None, limits: HttpLimits = HttpLimits()):
        self.backends = backends
        self.port = HttpPort("default/web:80", Balancer(spec), lambda: self.backends, cookie)
        self.pool = UpstreamPool(Dialer("node-a", 2.0))
        self.accepted = 0
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def _handle(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        self.accepted += 1
        serve_connection(sock, addr, self.port, self.pool, self.limits, fast=self.fast)

    limits: HttpLimits = HttpLimits()

    def stop(self) -> None:
        self.server.stop(timeout=1)
        self.pool.close()


@pytest.fixture(autouse=True, params=[True, False], ids=["callbacks", "greenlet"])
def fast(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Which path serves the connections: callbacks with hand-overs, or the greenlet alone."""
    monkeypatch.setattr(Proxy, "fast", request.param)
    return request.param


@pytest.fixture
def echo() -> Iterator[list[EchoBackend]]:
    backends = [EchoBackend(f"be{i}") for i in range(3)]
    yield backends
    for b in backends:
        b.stop()


def make_proxy(echo: list[EchoBackend], **kw: object) -> Proxy:
    limits = kw.pop("limits", HttpLimits())
    proxy = Proxy([b.backend for b in echo], **kw)  # type: ignore[arg-type]
    proxy.limits = limits  # type: ignore[assignment]
    return proxy


def names(session: requests.Session, url: str, n: int, **kw: object) -> Counter[str]:
    return Counter(session.get(url, **kw).json()["name"] for _ in range(n))  # type: ignore[arg-type]


def test_requests_on_one_connection_are_spread(echo: list[EchoBackend]) -> None:
    proxy = make_proxy(echo)
    with requests.Session() as s:
        seen = names(s, proxy.url + "/", 30)
    assert seen == {"be0": 10, "be1": 10, "be2": 10}  # round robin, per request
    assert proxy.accepted == 1  # all of it on one keep-alive client connection
    assert sum(b.connections for b in echo) == 3  # and one pooled connection per endpoint


def test_sticky_by_header(echo: list[EchoBackend]) -> None:
    proxy = make_proxy(echo, spec=LBSpec(Policy.CONSISTENT_HASH, HashKey.HTTP_HEADER, "X-User"))
    with requests.Session() as s:
        for user in ("alice", "bob", "carol", "dave"):
            assert len(names(s, proxy.url, 8, headers={"x-user": user})) == 1
        users = {s.get(proxy.url, headers={"X-User": f"u{i}"}).json()["name"]
                 for i in range(30)}
    assert len(users) > 1  # different keys land on different endpoints


def test_sticky_by_query_parameter(echo: list[EchoBackend]) -> None:
    proxy = make_proxy(echo, spec=LBSpec(Policy.CONSISTENT_HASH, HashKey.HTTP_QUERY, "shard"))
    with requests.Session() as s:
        assert len(names(s, proxy.url + "/a?x=1&shard=7", 8)) == 1
        assert len({s.get(f"{proxy.url}/?shard={i}").json()["name"] for i in range(30)}) > 1


def test_cookie_persistence_sets_then_sticks(echo: list[EchoBackend]) -> None:
    cookie = HttpCookie("sticky", "/", 3600.0)
    proxy = make_proxy(echo, spec=LBSpec(Policy.CONSISTENT_HASH, HashKey.HTTP_COOKIE, "sticky"),
                       cookie=cookie)
    with requests.Session() as s:
        first = s.get(proxy.url + "/")
        set_cookie = first.headers["Set-Cookie"]
        assert set_cookie.startswith('sticky="') and "Max-Age=3600" in set_cookie
        assert "Path=/" in set_cookie
        seen = names(s, proxy.url + "/", 12)  # the session sends the cookie back
        assert seen == {first.json()["name"]: 12}
        assert "Set-Cookie" not in s.get(proxy.url).headers
    fresh = Counter(requests.get(proxy.url).json()["name"] for _ in range(30))
    assert len(fresh) > 1  # clients without the cookie are spread


@pytest.mark.parametrize("ttl", [0.0, None])
def test_cookie_without_max_age_or_not_generated(echo: list[EchoBackend], ttl) -> None:
    # Envoy: ttl 0 generates a session cookie (no Max-Age); no ttl generates none at all
    proxy = make_proxy(echo, spec=LBSpec(Policy.CONSISTENT_HASH, HashKey.HTTP_COOKIE, "sticky"),
                       cookie=HttpCookie("sticky", "/", ttl))
    with requests.Session() as s:
        first = s.get(proxy.url + "/")
        if ttl is None:
            assert "Set-Cookie" not in first.headers
            assert len(names(s, proxy.url + "/", 30)) > 1  # no cookie, no hash: spread
        else:
            assert first.headers["Set-Cookie"].startswith('sticky="')
            assert "Max-Age" not in first.headers["Set-Cookie"]
            assert names(s, proxy.url + "/", 8) == {first.json()["name"]: 8}
        s.cookies.set("sticky", "abc")  # a client's own cookie is hashed either way
        assert len(names(s, proxy.url + "/", 8)) == 1


def test_sticky_by_source_ip(echo: list[EchoBackend]) -> None:
    proxy = make_proxy(echo, spec=LBSpec(Policy.CONSISTENT_HASH, HashKey.SOURCE_IP))
    assert len(Counter(requests.get(proxy.url).json()["name"] for _ in range(10))) == 1


def test_bodies_pass_through_chunked_large_and_expect_continue(echo: list[EchoBackend]) -> None:
    proxy = make_proxy(echo)
    big = bytes(range(256)) * 20000  # 5 MB
    with requests.Session() as s:
        r = s.post(proxy.url + "/up", data=iter([big[:1000], big[1000:]]))  # chunked
        assert r.json()["size"] == len(big)
        assert r.json()["sha256"] == hashlib.sha256(big).hexdigest()
        assert ["transfer-encoding", "chunked"] in r.json()["headers"]
        r = s.get(proxy.url + "/?size=3000000")
        assert r.content == bytes(i % 251 for i in range(3000000))
        r = s.get(proxy.url + "/?size=70000&chunked=1")
        assert r.headers["Transfer-Encoding"] == "chunked" and len(r.content) == 70000
        assert s.head(proxy.url + "/?size=10").content == b""
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "-H", "Expect: 100-continue",
                          "--data-binary", "@-", proxy.url + "/expect"], input=big[:200000],
                         capture_output=True, check=True)
    assert json.loads(out.stdout)["size"] == 200000
    assert proxy.accepted == 2


def test_close_delimited_response_closes_the_client(echo: list[EchoBackend]) -> None:
    proxy = make_proxy(echo)
    with requests.Session() as s:
        assert s.get(proxy.url + "/close").json()["target"] == "/close"
        assert s.get(proxy.url + "/").status_code == 200
    assert proxy.accepted == 2


def test_stale_pooled_connections_are_retried(echo: list[EchoBackend]) -> None:
    quick = EchoBackend("quick", idle_close=0.05)
    try:
        proxy = make_proxy([quick])
        with requests.Session() as s:
            for _ in range(4):
                assert s.get(proxy.url).status_code == 200
                gevent.sleep(0.15)  # the endpoint closes its idle connection meanwhile
        assert quick.connections == 4
    finally:
        quick.stop()


def test_websocket_upgrade_is_routed_then_spliced(echo: list[EchoBackend]) -> None:
    proxy = make_proxy(echo, spec=LBSpec(Policy.CONSISTENT_HASH, HashKey.HTTP_HEADER, "X-User"))
    url = proxy.url.replace("http", "ws") + "/ws"
    with ws_connect(url, additional_headers={"X-User": "alice"}, open_timeout=5) as conn:
        conn.send("hello")
        first = conn.recv(timeout=5)
        conn.send(b"abc")
        assert conn.recv(timeout=5) == b"cba"
    with ws_connect(url, additional_headers={"X-User": "alice"}, open_timeout=5) as conn:
        conn.send("again")
        assert conn.recv(timeout=5).split(":")[0] == first.split(":")[0]  # sticky here too


# ---- errors ---------------------------------------------------------------------------------


def raw_exchange(url: str, data: bytes, wait: float = 5.0) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_no_endpoints_is_503_naming_the_service() -> None:
    proxy = Proxy([])
    r = requests.get(proxy.url)
    assert r.status_code == 503 and "default/web:80" in r.text


def test_unreachable_endpoints_are_502() -> None:
    proxy = Proxy([Backend("127.0.0.1", free_port()), Backend("127.0.0.1", free_port())])
    r = requests.get(proxy.url)
    assert r.status_code == 502 and "default/web:80" in r.text


def test_dead_endpoint_is_skipped(echo: list[EchoBackend]) -> None:
    proxy = Proxy([Backend("127.0.0.1", free_port()), echo[0].backend])
    with requests.Session() as s:
        assert all(s.get(proxy.url).status_code == 200 for _ in range(6))


def test_slow_endpoint_is_504(echo: list[EchoBackend]) -> None:
    proxy = make_proxy(echo[:1], limits=HttpLimits(response_timeout=0.3))
    r = requests.get(proxy.url + "/slow")
    assert r.status_code == 504 and "default/web:80" in r.text


@pytest.mark.parametrize("data,status", [
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", b"400"),
    (b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", b"501"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 20000 + b"\r\n\r\n", b"431"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 150 + b"\r\n", b"431"),
])
def test_malformed_requests(echo: list[EchoBackend], data: bytes, status: bytes) -> None:
    proxy = make_proxy(echo)
    out = raw_exchange(proxy.url, data)
    assert out.startswith(b"HTTP/1.1 " + status)
    assert sum(b.requests for b in echo) == 0


def test_slow_client_is_dropped(echo: list[EchoBackend]) -> None:
    proxy = make_proxy(echo, limits=HttpLimits(head_timeout=0.3, idle_timeout=0.3))
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")  # and never the end of the head
        assert s.recv(100) == b""  # closed by the proxy, not by our timeout
    with socket.create_connection((host, int(port)), timeout=5) as s:
        assert s.recv(100) == b""  # an idle connection too


# ---- the engine's callback path and its hand-overs ------------------------------------------


def read_responses(sock: socket.socket, n: int) -> list[h11.Response | h11.Data]:
    """``n`` complete responses (each: the Response event and its body) read with h11."""
    conn = h11.Connection(h11.CLIENT)
    out: list = []
    for _ in range(n):
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
        conn.send(h11.EndOfMessage())
        head, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        out += [head, body]
        conn.start_next_cycle()
    return out


def test_pipelined_requests_are_answered_in_order(echo: list[EchoBackend]) -> None:
    proxy = make_proxy(echo)
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        for _ in range(2):  # the second round runs on pooled connections (callback path)
            s.sendall(b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(3)))
            got = read_responses(s, 3)
            assert [json.loads(got[i * 2 + 1])["target"] for i in range(3)] == ["/0", "/1", "/2"]


def test_timeout_on_a_pooled_connection_is_504(echo: list[EchoBackend]) -> None:
    proxy = make_proxy(echo[:1], limits=HttpLimits(response_timeout=0.3))
    with requests.Session() as s:
        assert s.get(proxy.url + "/").status_code == 200  # leaves a pooled connection
        r = s.get(proxy.url + "/slow")
        assert r.status_code == 504 and "default/web:80" in r.text
        assert s.get(proxy.url + "/").status_code == 200


def test_an_endpoint_closing_an_idle_connection_empties_the_pool() -> None:
    quick = EchoBackend("quick", idle_close=0.05)
    try:
        proxy = make_proxy([quick])
        assert requests.get(proxy.url).status_code == 200
        for _ in range(500):  # polled, no request made: the idle watcher notices the close
            if proxy.pool.idle_count() == 0:
                break
            gevent.sleep(0.01)
        assert proxy.pool.idle_count() == 0
    finally:
        quick.stop()


class Always503:
    """An endpoint answering every request with 503 (keep-alive)."""

    def __init__(self) -> None:
        self.requests = 0
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.backend = Backend("127.0.0.1", self.server.server_port)

    def _handle(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        buf = b""
        while data := sock.recv(65536):
            buf += data
            while b"\r\n\r\n" in buf:
                _, buf = buf.split(b"\r\n\r\n", 1)
                self.requests += 1
                sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")


class RetryingPort(HttpPort):
    """The proxy's router with the gateway's kind of retry: 503 moves to another endpoint."""

    def decide(self, head: RequestHead, raw: bytes, client_ip: str) -> Forward | Reply:
        fwd = super().decide(head, raw, client_ip)
        assert isinstance(fwd, Forward)
        fwd.attempts, fwd.retry_on = 2, (lambda status: status == 503)
        return fwd


def test_router_retries_a_status_on_another_endpoint(echo: list[EchoBackend]) -> None:
    bad = Always503()
    try:
        proxy = Proxy([bad.backend])
        proxy.port = RetryingPort("default/web:80", Balancer(LBSpec()), lambda: proxy.backends)
        with requests.Session() as s:
            # nothing else to try: the 503 is the answer, and its connection is pooled
            assert [s.get(proxy.url).status_code for _ in range(2)] == [503, 503]
            proxy.backends = [bad.backend, echo[0].backend]
            assert {s.get(proxy.url).status_code for _ in range(20)} == {200}
        assert bad.requests >= 7  # tried, on a pooled connection and on fresh ones
    finally:
        bad.server.stop(timeout=1)


def test_head_memo_returns_what_the_parser_returns() -> None:
    memo = _Memo()
    raw = b"GET /x HTTP/1.1\r\nHost: a\r\nX-User: u\r\n\r\n"
    first = memo.request(raw, HeadLimits())
    assert first == (parse_request_head(raw), True) and memo.request(raw, HeadLimits()) is first
    for tighter in (HeadLimits(max_fields=1), HeadLimits(max_size=10)):  # limits in the key
        with pytest.raises(HeadError):
            memo.request(raw, tighter)
    for i in range(MEMO_ENTRIES + 10):
        memo.request(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i, HeadLimits())
    assert len(memo.requests) <= MEMO_ENTRIES


# ---- both messages complete before an upstream connection is reused --------------------------

SCRIPTS = {  # what the Recorder answers, by request target
    b"/early417": b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n",
    b"/early200": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly",
    b"/early413": b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n",
    b"/early500": b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
    b"/head": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
    b"/204": b"HTTP/1.1 204 No Content\r\n\r\n",
    b"/304": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\nETag: \"x\"\r\n\r\n",
    b"/1xx": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
             b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"/nolength": b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
    b"/switch": b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    b"/badchunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"/badhead": b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
}
EARLY = (b"/early417", b"/early200", b"/early413", b"/early500")


class Recorder:
    """An endpoint that records exactly the bytes it receives, per connection, and answers as
    ``SCRIPTS`` says (else 200 naming the connection and target). Like a strict server, a body
    it answered early is still read and discarded before the next request is parsed; an
    ``Upgrade: h2c`` offer (or ``/switch``) is answered with 101 and the connection becomes
    raw bytes (recorded, never answered) — what an h2c-capable endpoint does."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []
        self.targets: list[list[bytes]] = []
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.backend = Backend("127.0.0.1", self.server.server_port)

    def _handle(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        got, targets = bytearray(), []
        self.received.append(got)
        self.targets.append(targets)
        sock.settimeout(10)
        buf = b""

        def more() -> bytes:
            data = sock.recv(65536)
            got.extend(data)
            return data

        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = more()
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.split(b"\r\n")
                target = lines[0].split(b" ")[1]
                targets.append(target)
                fields = dict((k.strip().lower(), v.strip())
                              for k, v in (line.split(b":", 1) for line in lines[1:]))
                length = int(fields.get(b"content-length", b"0"))
                h2c = b"h2c" in fields.get(b"upgrade", b"").lower()
                if target in EARLY or target == b"/switch" or h2c:
                    sock.sendall(SCRIPTS.get(target, SCRIPTS[b"/switch"]))
                    if target == b"/switch" or h2c:
                        while more():  # raw bytes from now on
                            pass
                        return
                while len(buf) < length:
                    data = more()
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                if target in EARLY:
                    continue
                answer = SCRIPTS.get(target)
                if answer is None:
                    body = b"conn%d %s" % (len(self.received) - 1, target)
                    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body),
                                                                                     body)
                sock.sendall(answer)
                if target == b"/nolength":
                    return
        except OSError:
            pass
        finally:
            sock.close()

    def stop(self) -> None:
        self.server.stop(timeout=1)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.stop()


def client(proxy: Proxy) -> socket.socket:
    host, port = proxy.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def until_closed(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def ask(sock: socket.socket, h: h11.Connection, method: str, target: str
        ) -> tuple[list[int], bytes]:
    """One request on a kept-alive client connection: the statuses seen (1xx included) and
    the body, read with h11."""
    sock.sendall(h.send(h11.Request(method=method, target=target, headers=[("Host", "a")])))
    sock.sendall(h.send(h11.EndOfMessage()))
    statuses, body = [], b""
    while True:
        event = h.next_event()
        if event is h11.NEED_DATA:
            h.receive_data(sock.recv(65536))
        elif isinstance(event, (h11.InformationalResponse, h11.Response)):
            statuses.append(event.status_code)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return statuses, body


def second_client_is_its_own_request(proxy: Proxy, recorder: Recorder) -> None:
    """Another client's request arrives on a fresh or clean connection, read as itself."""
    r = requests.get(proxy.url + "/second", timeout=5)
    assert r.status_code == 200 and r.content.endswith(b" /second")
    conn = int(r.content.split()[0].removeprefix(b"conn"))
    assert recorder.targets[conn][-1] == b"/second"


@pytest.mark.parametrize("target,expect,sent,length", [
    (b"/early417", True, 0, 10),  # refused before the client sent its body
    (b"/early200", True, 0, 10),  # answered without reading it
    (b"/early413", False, 1000, 100000),  # refused during an upload
    (b"/early500", False, 1000, 100000),
])
def test_early_answer_never_bleeds_into_another_clients_request(
        recorder: Recorder, target: bytes, expect: bool, sent: int, length: int) -> None:
    proxy = Proxy([recorder.backend])
    with client(proxy) as c:
        c.sendall(b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n%s\r\n"
                  % (target, length, b"Expect: 100-continue\r\n" if expect else b"")
                  + b"x" * sent)
        out = until_closed(c)  # the proxy closes after an early answer: the body is not read
    status = {b"/early417": b"417", b"/early200": b"200", b"/early413": b"413",
              b"/early500": b"500"}[target]
    assert out.startswith(b"HTTP/1.1 " + status) and out.count(b"HTTP/1.1") == 1
    assert b"\r\nConnection: close\r\n" in out  # and says it will close (RFC 9112 9.6)
    second_client_is_its_own_request(proxy, recorder)
    assert proxy.pool.idle_count() <= 1  # only the second request's connection


@pytest.mark.parametrize("method,target,statuses,body", [
    ("HEAD", "/head", [200], b""),
    ("GET", "/204", [204], b""),
    ("GET", "/304", [304], b""),
    ("GET", "/1xx", [100, 103, 200], b"ok"),
])
def test_complete_exchanges_reuse_the_upstream_connection(
        recorder: Recorder, method: str, target: str, statuses: list[int], body: bytes) -> None:
    proxy = Proxy([recorder.backend])
    with client(proxy) as c:
        h = h11.Connection(h11.CLIENT)
        for _ in range(2):
            assert ask(c, h, method, target) == (statuses, body)
            h.start_next_cycle()
            got = ask(c, h, "GET", "/after")
            assert got[0] == [200] and got[1].endswith(b" /after")
            h.start_next_cycle()
    assert recorder.targets == [[target.encode(), b"/after"] * 2]  # one connection, in step
    assert bytes(recorder.received[0]).count(b"\r\n\r\n") == 4  # nothing but the four heads


def test_interim_responses_are_not_sent_to_http10_clients(recorder: Recorder) -> None:
    proxy = Proxy([recorder.backend])
    with client(proxy) as c:
        c.sendall(b"GET /1xx HTTP/1.0\r\nHost: a\r\n\r\n")
        out = until_closed(c)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nok")
    assert b" 100 " not in out and b" 103 " not in out


def test_close_delimited_response_is_never_pooled(recorder: Recorder) -> None:
    proxy = Proxy([recorder.backend])
    with client(proxy) as c:
        c.sendall(b"GET /nolength HTTP/1.1\r\nHost: a\r\n\r\n")
        assert until_closed(c).endswith(b"\r\n\r\nuntil the end")
    second_client_is_its_own_request(proxy, recorder)
    assert recorder.targets == [[b"/nolength"], [b"/second"]]


# ---- upgrades only where intended ------------------------------------------------------------

H2C = (b"GET /h2c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
       b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")


def test_h2c_offer_is_stripped_before_it_goes_upstream(recorder: Recorder) -> None:
    proxy = Proxy([recorder.backend])
    with client(proxy) as c:
        c.sendall(H2C + b"GET /second HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        out = until_closed(c)
    assert out.count(b"HTTP/1.1 200 OK") == 2 and b" /h2c" in out and b" /second" in out
    seen = b"".join(recorder.received).lower()
    assert b"upgrade" not in seen and b"http2-settings" not in seen
    assert recorder.targets == [[b"/h2c", b"/second"]]  # both routed, one by one


def test_101_without_a_websocket_handshake_is_502_and_nothing_is_spliced(
        recorder: Recorder) -> None:
    proxy = Proxy([recorder.backend])
    with client(proxy) as c:
        h = h11.Connection(h11.CLIENT)
        assert ask(c, h, "GET", "/warm")[0] == [200]  # a pooled connection: the fast path
        c.sendall(b"GET /switch HTTP/1.1\r\nHost: a\r\n\r\n")
        gevent.sleep(0.2)
        try:
            c.sendall(b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n")  # must not pass routing
        except OSError:
            pass
        out = until_closed(c)
    assert out.startswith(b"HTTP/1.1 502") and b"101" not in out.split(b"\r\n")[0]
    assert b"/admin" not in b"".join(recorder.received)
    assert proxy.pool.idle_count() == 0


# ---- malformed messages: whose fault -----------------------------------------------------------


def malformed_count(sender: str, cause: str) -> float:
    return MALFORMED.labels(sender, cause).value


def requests_count(code: str) -> float:
    return REQUESTS.labels("default/web:80", code).value


def chunk_cause(data: bytes) -> str:
    try:
        BodyTracker(Framing.CHUNKED).feed(data)
    except HeadError as e:
        return e.cause
    raise AssertionError("not malformed")


@pytest.mark.parametrize("mid_stream", [False, True], ids=["with-head", "mid-stream"])
def test_malformed_chunked_body_is_the_clients_fault(
        echo: list[EchoBackend], mid_stream: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = make_proxy(echo[:1])
    cause = chunk_cause(b"zz\r\n")
    before = (malformed_count("client", cause), requests_count("400"), requests_count("502"),
              malformed_count("endpoint", cause))
    for _ in range(3):  # logged once, counted each time
        with client(proxy) as c:
            c.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            if mid_stream:
                c.sendall(b"5\r\nhello\r\n")
                gevent.sleep(0.1)
            c.sendall(b"zz\r\n")
            out = until_closed(c)
        assert out.startswith(b"HTTP/1.1 400")
    after = (malformed_count("client", cause), requests_count("400"), requests_count("502"),
             malformed_count("endpoint", cause))
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 3, 0, 0]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert sum(1 for r in caplog.records if "malformed" in r.getMessage()) <= 1


@pytest.mark.parametrize("target", ["/badchunk", "/badhead"])
def test_malformed_response_is_the_endpoints_fault(recorder: Recorder, target: str) -> None:
    proxy = Proxy([recorder.backend])
    before = requests_count("502"), MALFORMED.labels("client", "malformed").value
    with requests.Session() as session:
        assert session.get(proxy.url + "/warm", timeout=5).status_code == 200  # pooled
        assert session.get(proxy.url + target, timeout=5).status_code == 502
    assert requests_count("502") == before[0] + 1
    assert MALFORMED.labels("client", "malformed").value == before[1]


def test_a_real_upload_gets_the_early_answer(recorder: Recorder) -> None:
    proxy = Proxy([recorder.backend])
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time",
                          "10", "--data-binary", "@-", proxy.url + "/early413"],
                         input=b"x" * 5_000_000, capture_output=True, check=True)
    assert out.stdout == b"413"  # read, not reset away, while curl was still sending
    second_client_is_its_own_request(proxy, recorder)
