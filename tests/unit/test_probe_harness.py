"""The HTTP probe harness itself: the recording backend's strict reading, the deny check's path
normalisation, the client-side response reader, and the catalogue's shape. If these are
wrong, an UNSAFE verdict in tests/e2e/test_http_probes.py could be the harness's fault."""
from __future__ import annotations

import socket

import pytest

from tests.http_probes import PROBES, Kind
from tests.probe_runner import Front, check_live, exchange, normalised_path, parse_responses
from tests.recording_backend import RecordingBackend, StrictError, check_target, framing, parse_head


@pytest.mark.parametrize("head", [
    b"GET /x HTTP/1.1\r\nHost: a\r\nX: a\x00b",
    b"GET /x HTTP/1.1\r\nHost: a\r\nX : b",
    b"GET /x HTTP/1.1\r\nHost: a\r\n b",
    b"GET /x HTTP/2.0\r\nHost: a",
    b"GET  /x HTTP/1.1\r\nHost: a",
    b"GET /x HTTP/1.1\r\nHost: a\nX: b",
])
def test_strict_head_refuses(head: bytes) -> None:
    with pytest.raises(StrictError):
        parse_head(head)


@pytest.mark.parametrize("fields", [
    [("Content-Length", "5"), ("Content-Length", "5")],
    [("Content-Length", "5, 5")],
    [("Content-Length", "18446744073709551621")],
    [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
    [("Transfer-Encoding", "chunked, gzip")],
])
def test_strict_framing_refuses(fields: list[tuple[str, str]]) -> None:
    with pytest.raises(StrictError):
        framing(fields)


def test_strict_framing_reads() -> None:
    assert framing([("Content-Length", "00000000000000000005")]) == ("length", 5)
    assert framing([("transfer-encoding", "gzip, Chunked")]) == ("chunked", 0)
    with pytest.raises(StrictError):
        framing([("Transfer-Encoding", "chunked")], "HTTP/1.0")


@pytest.mark.parametrize("method,target,host", [
    ("GET", "*", "a"), ("GET", "a:80", "a"), ("GET", "admin/x", "a"),
    ("GET", "http://b/x", "a"), ("GET", "http://u@a/x", "a"), ("GET", "ftp://a/x", "a"),
    ("GET", "/x", "a/b"), ("GET", "/x", "a b"), ("GET", "/x", "a:abc"),
])
def test_strict_target_and_host_refuse(method: str, target: str, host: str) -> None:
    with pytest.raises(StrictError):
        check_target(method, target, [("Host", host)], "HTTP/1.1")


def test_strict_target_accepts() -> None:
    for method, target in (("GET", "/x"), ("OPTIONS", "*"), ("GET", "HTTP://a:80/x"),
                           ("CONNECT", "a:443")):
        check_target(method, target, [("Host", "a:80" if "80" in target else "a")],
                     "HTTP/1.1")


@pytest.mark.parametrize("target,expected", [
    ("/p-dots/../admin/x", b"/admin/x"), ("http://h/admin/..", b"/"), ("admin/x", b"/admin/x"),
    ("//admin", b"/admin"), ("/%61dmin", b"/admin"), ("/p/..;/admin", b"/admin"),
    ("/p?/../admin", b"/p"), ("/../../admin", b"/admin"),
])
def test_normalised_path(target: str, expected: bytes) -> None:
    assert normalised_path(target) == expected


def test_parse_responses_pipelined_head_and_chunked() -> None:
    raw = (b"HTTP/1.1 100 Continue\r\n\r\n"
           b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nX-Method: HEAD\r\nX-Seen: 1 /x\r\n\r\n"
           b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Seen: 2 /y\r\n\r\n"
           b"3\r\nabc\r\n0\r\n\r\n"
           b"HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n")
    responses, rest = parse_responses(raw, closed=True)
    assert [r.status for r in responses] == [100, 200, 200, 400]
    assert [r.seen for r in responses] == [None, (1, "/x"), (2, "/y"), None]
    assert responses[2].body == b"abc" and rest == b""


def test_backend_records_a_smuggled_request_as_its_own() -> None:
    backend = RecordingBackend()
    front = Front("direct", "127.0.0.1", backend.port, backend, routes=False)
    try:
        with socket.create_connection(("127.0.0.1", backend.port)) as sock:
            ex = exchange(sock, (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked"
                                 b"\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",),
                          0, 2.0)
        assert [r.target for r in backend.requests()] == ["/x", "/smuggled"]
        assert [r.seen for r in ex.responses] == [(1, "/x"), (2, "/smuggled")]
        assert check_live(front).ok
        backend.reset()
        with socket.create_connection(("127.0.0.1", backend.port)) as sock:
            exchange(sock, (b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\nx",),
                     0, 2.0)
        assert backend.errors() and not any(r.complete for r in backend.requests())
    finally:
        backend.stop()


def test_catalogue_covers_the_issue() -> None:
    names = {p.name for p in PROBES}
    for required in ("redos-blank-fields-then-bad-line", "expect-early-answer-bleed",
                     "h2c-full-then-admin", "abs-admin-dotdot", "path-dotdot",
                     "no-leading-slash-admin", "abs-authority-differs", "te-on-http10",
                     "cl-list-same", "cl-duplicate-same", "cl-20-digits-wraps",
                     "chunk-17-hex-digits", "chunk-ext-nul", "version-http2-line",
                     "version-http99", "target-authority-form", "target-asterisk-get",
                     "host-with-slash", "host-with-space", "chunk-malformed-with-head",
                     "chunk-malformed-mid-stream"):
        assert required in names
    assert {p.kind for p in PROBES} == set(Kind)
    assert all(p.ref and p.safe for p in PROBES)
