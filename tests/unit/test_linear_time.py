"""Every parser of untrusted bytes runs in time linear in its input: each is fed adversarial
inputs of growing size (n, 4n, 16n) and the time may grow at most ~linearly, judged by ratios
between sizes (best of several timings), never by absolute times.

The shapes are the ones that made backtracking patterns blow up: runs of spaces and tabs that
optional whitespace could share, many such fields before a malformed line (the 354-byte head
that once froze the process for 6 s), long tokens, long targets, long chunk extensions and
trailers, and big cookie fields, DNS answers and manifests. Limits are raised far above the
defaults so that the algorithm, not a size cap, is what is measured.
"""
from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable

import pytest

from edgemesh.config import dns_name
from edgemesh.dns.wire import FormatError, parse_query, records
from edgemesh.meta.files import read_manifest
from edgemesh.proxy.http_body import MAX_LINE, MAX_SIZE_LINE, BodyTracker
from edgemesh.proxy.http_head import (
    Framing,
    HeadError,
    HeadLimits,
    head_end,
    parse_request_head,
    parse_response_framing,
    parse_response_head,
)
from edgemesh.proxy.http_router import cookie_value

SLACK = 3.0  # t(k*n) / t(n) may be up to k * SLACK: room for noise, none for n**2
BIG = HeadLimits(max_size=1 << 22, max_fields=1 << 20)


def _per_call(fn: Callable[[bytes], object], arg: bytes, budget: float) -> float:
    """Best time of one call over several batches of about 10 ms; gives up early (returning
    what one call took) when a single call exceeds ``budget``, so a blow-up fails fast."""
    start = time.perf_counter()
    fn(arg)
    once = time.perf_counter() - start
    if once > budget:
        return once
    number = max(1, int(0.01 / max(once, 1e-7)))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(number):
            fn(arg)
        best = min(best, (time.perf_counter() - start) / number)
    return best


def assert_linear(fn: Callable[[bytes], object], make: Callable[[int], bytes], n: int) -> None:
    """Fails only when three measurements in a row see super-linear growth: a preempted batch
    on a busy machine can spoil one, while a real blow-up is seen every time."""
    for _ in range(3):
        ratios = _ratios(fn, make, n)
        if all(r < k * SLACK for k, r in ratios):
            return
        if any(r >= k * SLACK * 30 for k, r in ratios):
            break  # a blow-up: no need to see it again
    k, r = max(ratios, key=lambda kr: kr[1] / kr[0])
    raise AssertionError(f"t({k}n)/t(n) = {r:.1f} for n={n}")


def _ratios(fn: Callable[[bytes], object], make: Callable[[int], bytes], n: int
            ) -> list[tuple[int, float]]:
    base = _per_call(fn, make(n), float("inf"))
    out = []
    for k in (4, 16):
        # a call that takes 30x longer than allowed needs no repeats to be judged
        t = _per_call(fn, make(k * n), base * k * SLACK * 30)
        out.append((k, t / base))
        if t / base >= k * SLACK * 30:
            break
    return out


def request(data: bytes) -> None:
    try:
        end = head_end(data, BIG)
        if end > 0:
            parse_request_head(data[:end], BIG)
    except HeadError:
        pass


def response(data: bytes) -> None:
    for parse in (parse_response_head, parse_response_framing):
        try:
            end = head_end(data, BIG, request=False)
            if end > 0:
                parse(data[:end], b"GET", BIG)
        except HeadError:
            pass


REQ = b"GET / HTTP/1.1\r\nHost: a\r\n"
RESP = b"HTTP/1.1 200 OK\r\n"

HEAD_SHAPES: dict[str, tuple[Callable[[int], bytes], int]] = {
    # the head of issue #13: four fields of blanks, then a line that does not parse
    "blank fields then a bad line": (
        lambda n: b"X-Blank:" + b" " * n + b"\r\nX-Blank:" + b" " * n + b"\r\nX-Blank:" +
        b" " * n + b"\r\nX-Blank:" + b" " * n + b"\r\nbad line\r\n\r\n", 16),
    "many blank fields then a bad line": (
        lambda n: b"X-Blank: \t \t \r\n" * n + b"bad line\r\n\r\n", 16),
    "one run of blanks then NUL": (lambda n: b"X:" + b" \t" * n + b"\x00\r\n\r\n", 256),
    "blanks between words then NUL": (lambda n: b"X: a" + b"  \t a" * n + b"\x00\r\n\r\n", 64),
    "blanks then CR": (lambda n: b"X: a" + b" " * n + b"\ra\r\n\r\n", 256),
    "long name without a colon": (lambda n: b"X" * n + b"\r\n\r\n", 256),
    "long name then a space": (lambda n: b"X" * n + b" : a\r\n\r\n", 256),
    "many valid fields": (lambda n: b"X-Field: some value\r\n" * n + b"\r\n", 16),
    "long valid value": (lambda n: b"X: " + b"a b\tc " * n + b"\r\n\r\n", 64),
}


@pytest.mark.parametrize("shape", list(HEAD_SHAPES))
def test_request_heads(shape: str) -> None:
    make, n = HEAD_SHAPES[shape]
    assert_linear(request, lambda k: REQ + make(k), n)


@pytest.mark.parametrize("make,n", [
    (lambda n: b"GET /" + b"a/" * n + b"# HTTP/1.1\r\nHost: a\r\n\r\n", 64),
    (lambda n: b"GET http://" + b"a." * n + b"/\\ HTTP/1.1\r\nHost: a\r\n\r\n", 64),
    (lambda n: b"GET /" + b"%a" * n + b"% HTTP/1.1\r\nHost: a\r\n\r\n", 64),
    (lambda n: b"GET / HTTP/1.1\r\nHost: " + b"a." * n + b":655366\r\n\r\n", 64),
    (lambda n: b"GET / HTTP/1.1\r\nHost: [" + b"1:" * n + b"]\r\n\r\n", 64),
    (lambda n: b"G" * n + b"  HTTP/1.1\r\nHost: a\r\n\r\n", 64),
    (lambda n: b"GET /" + b" " * n + b"HTTP/1.1\r\nHost: a\r\n\r\n", 64),
], ids=["target with #", "absolute-form", "percent", "host", "ipv6 host", "method",
        "blanks in the request line"])
def test_request_lines_targets_and_hosts(make: Callable[[int], bytes], n: int) -> None:
    assert_linear(request, make, n)


@pytest.mark.parametrize("shape", list(HEAD_SHAPES))
def test_response_heads(shape: str) -> None:
    make, n = HEAD_SHAPES[shape]
    assert_linear(response, lambda k: RESP + make(k), n)


@pytest.mark.parametrize("make,n", [
    (lambda n: RESP + b"X: a\n" + b" \t  \n" * n + b"bad\n\n", 16),  # folded blank lines
    (lambda n: RESP + b"X: a\n" + b"  b  c\n" * n + b"\x00\n\n", 16),
    (lambda n: b"HTTP/1.1 200 " + b" \t" * n + b"\x00\r\n\r\n", 64),
    (lambda n: RESP + b"X:" + b" " * n + b"\r\r\n\r\n", 64),
], ids=["folded blanks", "folded words then NUL", "reason blanks", "stray CR"])
def test_response_specific_shapes(make: Callable[[int], bytes], n: int) -> None:
    assert_linear(response, make, n)


def test_head_arriving_in_small_pieces() -> None:
    """A shell that passes ``start`` scans a head sent a few bytes at a time only once."""
    def pieces(data: bytes) -> None:
        buf, start = bytearray(), 0
        for i in range(0, len(data), 4):
            buf += data[i:i + 4]
            head_end(buf, BIG, start=start)
            start = len(buf)
    assert_linear(pieces, lambda n: REQ + b"X-Field: some value\r\n" * n, 32)


def chunked(data: bytes) -> None:
    try:
        BodyTracker(Framing.CHUNKED).feed(data)
    except HeadError:
        pass


@pytest.mark.parametrize("make,n", [
    (lambda n: b"5;a" + b" " * n + b"x\r\n", MAX_SIZE_LINE // 20),
    (lambda n: b"5;" + b" " * n + b"\n", MAX_SIZE_LINE // 20),
    (lambda n: b"5;a" + b" \t" * (n // 2) + b"=\r\n", MAX_SIZE_LINE // 20),
    (lambda n: b"5" + b";a=b" * (n // 4) + b" \x00\r\n", MAX_SIZE_LINE // 20),
    (lambda n: b"5" + b" ;a" * (n // 3) + b"\r\n", MAX_SIZE_LINE // 20),
    (lambda n: b'5;a="' + b'\\"' * (n // 2) + b"\r\n", MAX_SIZE_LINE // 20),
    (lambda n: b"0\r\nX:" + b" " * n + b"\x00\r\n\r\n", MAX_LINE // 20),
    (lambda n: b"0\r\nX: a" + b" \t a" * (n // 4) + b"\r\r\n\r\n", MAX_LINE // 20),
    (lambda n: b"0\r\n" + b"X: \t \r\n" * (n // 8) + b"bad\r\n\r\n", MAX_LINE // 20),
], ids=["extension blanks", "extension blanks, bare LF", "blanks before =",
        "many extensions then NUL", "blank before each ;", "escaped quotes, unterminated",
        "trailer blanks then NUL", "trailer words then CR", "many trailers then a bad one"])
def test_chunk_lines_and_trailers(make: Callable[[int], bytes], n: int) -> None:
    assert_linear(chunked, make, n)


# ---- cookies ----------------------------------------------------------------------------------

def test_cookie_value() -> None:
    def find(data: bytes) -> None:
        cookie_value(parse_request_head(data, BIG), "wanted")
    assert_linear(find, lambda n: REQ + b"Cookie: " + b"a=b; \t c=\"d\";" * n + b"\r\n\r\n", 64)


def test_cookie_key_over_many_cookie_lines() -> None:
    from edgemesh.proxy.http_router import request_key
    from edgemesh.proxy.lb import HashKey, LBSpec
    spec = LBSpec(hash_key=HashKey.HTTP_COOKIE, hash_name="wanted")

    def key(data: bytes) -> None:
        request_key(spec, parse_request_head(data, BIG), "10.0.0.1")
    assert_linear(key, lambda n: REQ + b"Cookie: a=b;  c==;\r\n" * n + b"\r\n", 16)


# ---- DNS --------------------------------------------------------------------------------------

def test_dns_query_names() -> None:
    def parse(data: bytes) -> None:
        try:
            parse_query(data)
        except FormatError:
            pass
    header = struct.pack("!6H", 1, 0x0100, 1, 0, 0, 0)
    # names are capped at 255 bytes, so the long inputs are refused labels further on
    assert_linear(parse, lambda n: header + b"\x01a" * n + b"\x00\x00\x01\x00\x01", 16)


def test_dns_answers_from_an_upstream() -> None:
    def answer(n: int) -> bytes:
        rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + b"\x0a\x00\x00\x01"
        return struct.pack("!6H", 1, 0x8180, 1, n, 0, 0) + b"\x01a\x00\x00\x01\x00\x01" + rr * n
    assert_linear(lambda data: sum(1 for _ in records(data)), answer, 16)


def test_dns_names_in_config() -> None:
    assert_linear(lambda data: dns_name(data.decode()), lambda n: b"a." * n + b".", 64)


# ---- manifests --------------------------------------------------------------------------------

def _service(i: int) -> str:
    return (f"---\napiVersion: v1\nkind: Service\nmetadata:\n  name: s{i}\n  namespace: ns\n"
            f"  labels: {{app: \"a  b\\t  c\"}}\nspec:\n  selector: {{app: web}}\n  ports:\n"
            f"  - {{name: http, port: {i % 60000 + 1}, targetPort: 8080}}\n")


@pytest.mark.parametrize("kind", ["many documents", "one big list", "json"])
def test_manifests(kind: str) -> None:
    def make(n: int) -> bytes:
        if kind == "many documents":
            return "".join(_service(i) for i in range(n)).encode()
        items = [{"apiVersion": "v1", "kind": "Service",
                  "metadata": {"name": f"s{i}", "namespace": "ns"},
                  "spec": {"ports": [{"name": "http", "port": i % 60000 + 1}]}}
                 for i in range(n)]
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": items}).encode()
    path = "big.json" if kind == "json" else "big.yaml"

    def load(data: bytes) -> None:
        parsed, problems = read_manifest(path, data.decode())
        assert parsed and not problems
    assert_linear(load, make, 8)


def test_manifest_with_long_blank_runs() -> None:
    def make(n: int) -> bytes:
        return (f"apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n  namespace: ns\n"
                f"  annotations: {{a: \"{'  ' * n}x\", b: '{chr(9) * n}'}}\n"
                f"spec:\n  ports:\n  - {{port: 80}}\n").encode()
    assert_linear(lambda data: read_manifest("x.yaml", data.decode()), make, 256)
