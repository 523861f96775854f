"""Request targets normalised as Istio's BASE (+ merged slashes), authorities validated."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemesh.proxy import http_target
from edgemesh.proxy.http_target import (
    Authority,
    NormalTarget,
    TargetError,
    normalize_path,
    normalize_request,
    parse_authority,
)
from tests.unit.test_linear_time import assert_linear


@pytest.mark.parametrize(("raw", "want"), [
    (b"/", b"/"),
    (b"/a/b/c", b"/a/b/c"),
    (b"/.well-known/x", b"/.well-known/x"),
    (b"/a/./b", b"/a/b"),
    (b"/a/../b", b"/b"),
    (b"/p-dots/../admin/x", b"/admin/x"),
    (b"/a/b/..", b"/a/"),
    (b"/a/b/.", b"/a/b/"),
    (b"/..", b"/"),
    (b"/../admin", b"/admin"),  # clamped at the root (RFC 3986 5.2.4)
    (b"/../../../admin/x", b"/admin/x"),
    (b"/a/%2e%2e/admin", b"/admin"),
    (b"/a/%2E%2e/admin", b"/admin"),
    (b"/a/.%2e/admin", b"/admin"),
    (b"/%2e/admin", b"/admin"),
    (b"/%61dmin", b"/admin"),  # unreserved escapes decoded
    (b"/%7euser/%2Dx%5f", b"/~user/-x_"),
    (b"/a%2fb", b"/a/b"),  # %2F decoded (Istio DECODE_AND_MERGE_SLASHES, nginx)
    (b"/a%2F..%2Fadmin", b"/admin"),  # so escaped slashes cannot hide dot segments
    (b"/a%5cb", b"/a/b"),
    (b"/a%3fb", b"/a%3Fb"),  # other reserved escapes kept, hex upper-cased
    (b"/a%25b", b"/a%25b"),
    (b"/a\\..\\admin", b"/admin"),  # backslash is a slash, as Envoy's normaliser
    (b"//admin/x", b"/admin/x"),  # slashes merged
    (b"/a//b///c", b"/a/b/c"),
    (b"/a//", b"/a/"),
    (b"//", b"/"),
    (b"/a//../b", b"/b"),
    (b"/a/b/../../..//admin", b"/admin"),
    (b"/x|y{z}", b"/x%7Cy%7Bz%7D"),  # characters a path may not hold, encoded as Envoy does
    (b"/a;b=c/d:e@f!$&'()*+,", b"/a;b=c/d:e@f!$&'()*+,"),
])
def test_paths(raw: bytes, want: bytes) -> None:
    assert normalize_path(raw) == want


@pytest.mark.parametrize("raw", [b"/a%zz", b"/a%", b"/a%2", b"/a%00b", b"admin/x", b"",
                                 b"*", b"/a b", b"/a\x00", b"/\xff",
                                 b"/p/..;/admin", b"/p/.;x/admin", b"/..;jsessionid=1/x"])
def test_bad_paths(raw: bytes) -> None:
    with pytest.raises(TargetError) as e:
        normalize_path(raw)
    assert e.value.status == 400


@pytest.mark.parametrize(("target", "host", "want"), [
    (b"/p?q=/../x", b"app.example.com",
     NormalTarget(Authority(b"app.example.com"), b"/p", b"q=/../x")),
    (b"/p?", b"App.Example.COM:8080",
     NormalTarget(Authority(b"app.example.com", 8080), b"/p", b"")),
    (b"/p", None, NormalTarget(None, b"/p", None)),
    (b"http://app.example.com/admin/x", b"app.example.com",
     NormalTarget(Authority(b"app.example.com"), b"/admin/x", None, absolute=True)),
    (b"HTTP://APP.example.com:80/a/../admin?x=1", b"app.example.com",
     NormalTarget(Authority(b"app.example.com", 80), b"/admin", b"x=1", absolute=True)),
    (b"http://app.example.com", b"app.example.com:80",
     NormalTarget(Authority(b"app.example.com"), b"/", None, absolute=True)),
    (b"http://app.example.com?x", b"app.example.com",
     NormalTarget(Authority(b"app.example.com"), b"/", b"x", absolute=True)),
    (b"https://app.example.com/", b"app.example.com:443",
     NormalTarget(Authority(b"app.example.com"), b"/", None, absolute=True)),
    (b"http://app.example.com./", b"APP.example.com",
     NormalTarget(Authority(b"app.example.com"), b"/", None, absolute=True)),
    (b"http://other.example.com/x", None,  # HTTP/1.0 without Host: the URI names it
     NormalTarget(Authority(b"other.example.com"), b"/x", None, absolute=True)),
    (b"http://[::1]:8080/x", b"[0:0::1]:8080",
     NormalTarget(Authority(b"[::1]", 8080), b"/x", None, absolute=True)),
])
def test_requests(target: bytes, host: bytes | None, want: NormalTarget) -> None:
    assert normalize_request(target, host) == want


@pytest.mark.parametrize(("target", "host", "cause"), [
    (b"http://other.example.com/admin", b"app.example.com", "authority_mismatch"),
    (b"http://app.example.com:8080/", b"app.example.com", "authority_mismatch"),
    (b"https://app.example.com/", b"app.example.com:80", "authority_mismatch"),
    (b"http://app.example.com/", b"", "authority_mismatch"),
    (b"http://user@app.example.com/", b"app.example.com", "bad_host"),
    (b"http:///admin", b"app.example.com", "bad_host"),
    (b"ftp://app.example.com/", b"app.example.com", "bad_target"),
    (b"app.example.com:80", b"app.example.com", "bad_target"),
    (b"*", b"app.example.com", "bad_target"),
    (b"admin/x", b"app.example.com", "bad_target"),
    (b"/x#frag", b"app.example.com", "bad_target"),
    (b"/x?a\r\nb", b"app.example.com", "bad_target"),
    (b"/x", b"app.example.com/admin", "bad_host"),
    (b"/x", b"app example.com", "bad_host"),
    (b"/x", b"evil@app.example.com", "bad_host"),
    (b"/x", b"*.example.com", "bad_host"),
    (b"/x", b"a.example.com:99999", "bad_host"),
    (b"/x", b"a.example.com:8a", "bad_host"),
    (b"/x", b"a..example.com", "bad_host"),
    (b"/x", b"[::1", "bad_host"),
    (b"/x", b"[not:v6]", "bad_host"),
    (b"/x", b"[::1]x", "bad_host"),
    (b"/x", b"a%2eexample.com", "bad_host"),
])
def test_refused(target: bytes, host: bytes, cause: str) -> None:
    with pytest.raises(TargetError) as e:
        normalize_request(target, host)
    assert (e.value.status, e.value.cause) == (400, cause)


def test_authority_text_and_hostname() -> None:
    assert parse_authority(b"A.Example.com.:8080").text() == b"a.example.com:8080"
    assert parse_authority(b"a.example.com:").text() == b"a.example.com"
    t = normalize_request(b"/x", b"Shop.Example.com:81")
    assert t.hostname == "shop.example.com" and t.origin == b"/x"


def _normalize(target: bytes) -> None:
    try:  # the algorithm itself, not the cache in front of it
        http_target._normalize_request(target, b"app.example.com")
    except TargetError:
        pass


@pytest.mark.parametrize("unit", [b"/..", b"/a/.", b"//", b"/%2e%2e", b"/%41", b"/%2F",
                                  b"/\\.", b"/x|"])
def test_linear_time(unit: bytes) -> None:
    # the shared judge: three measurements in a row must see super-linear growth to fail
    assert_linear(_normalize, lambda n: unit * n, 200)


# ---- the per-request proxy's router sends the normalised target ----------------------------------

def _port_decides(raw: bytes) -> object:
    from edgemesh.proxy.http_head import HeadError, parse_request_head
    from edgemesh.proxy.http_listen import HttpPort
    from edgemesh.proxy.lb import Balancer, LBSpec
    port = HttpPort("default/web:80", Balancer(LBSpec()), lambda: [])
    try:
        head = parse_request_head(raw)
    except HeadError as e:  # the head parser refuses it first; the port must refuse it too
        assert e.status == 400
        line, host = raw.split(b"\r\n")[:2]
        head = parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")._replace(
            target=line.split(b" ")[1], host=host.partition(b": ")[2])
    return port.decide(head, raw, "10.0.0.9")


@pytest.mark.parametrize(("raw", "wire"), [
    (b"GET /a/b?c HTTP/1.1\r\nHost: web\r\n\r\n", None),  # untouched: the same bytes
    (b"GET /p-dots/../admin//x HTTP/1.1\r\nHost: Web\r\nA: 1\r\n\r\n",
     b"GET /admin/x HTTP/1.1\r\nHost: Web\r\nA: 1\r\n\r\n"),
    (b"GET http://web.default:80/%61/./b?q=%2e%2e HTTP/1.1\r\nA: 1\r\nhost: web.default\r\n\r\n",
     b"GET /a/b?q=%2e%2e HTTP/1.1\r\nHost: web.default:80\r\nA: 1\r\n\r\n"),
    (b"GET http://web/x HTTP/1.0\r\n\r\n", b"GET /x HTTP/1.0\r\nHost: web\r\n\r\n"),
])
def test_proxy_forwards_origin_form(raw: bytes, wire: bytes | None) -> None:
    fwd = _port_decides(raw)
    assert fwd.wire == (raw if wire is None else wire)  # type: ignore[attr-defined]


@pytest.mark.parametrize("raw", [
    b"GET http://other/x HTTP/1.1\r\nHost: web\r\n\r\n",
    b"GET admin/x HTTP/1.1\r\nHost: web\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: web/x\r\n\r\n",
    b"GET /%zz HTTP/1.1\r\nHost: web\r\n\r\n",
])
def test_proxy_refuses_with_400(raw: bytes) -> None:
    reply = _port_decides(raw)
    assert reply.status == 400 and not reply.keep  # type: ignore[attr-defined]
    assert reply.data.startswith(b"HTTP/1.1 400 Bad Request\r\n")  # type: ignore[attr-defined]


# ---- properties on arbitrary input ---------------------------------------------------------------

_PIECES = st.sampled_from([b"/", b".", b"..", b"%2e", b"%2E", b"%2f", b"%5C", b"\\", b"a", b"%41",
                           b"?", b"#", b"%", b"%00", b"|", b" ", b"\x00", b"http://", b"@", b":"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES | st.binary(max_size=3), max_size=20).map(b"".join))
def test_normalised_paths_are_fixed_points(target: bytes) -> None:
    try:
        t = normalize_request(target, b"a.example.com")
    except TargetError as e:
        assert e.status == 400
        return
    path = t.path
    assert path.startswith(b"/") and b"//" not in path
    assert not any(seg in (b".", b"..") for seg in path.split(b"/"))
    assert not path.translate(None, bytes(range(0x21, 0x7F))) and b"\\" not in path
    assert normalize_path(path) == path  # normalising twice changes nothing


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_authorities_are_strict_and_stable(raw: bytes) -> None:
    try:
        a = parse_authority(raw)
    except TargetError:
        return
    assert not a.host.translate(None, b"abcdefghijklmnopqrstuvwxyz0123456789-._~[]:")
    assert parse_authority(a.text()) == a


def test_answers_are_remembered_only_for_short_targets() -> None:
    long_target = b"/" + b"a" * 1000
    first = normalize_request(b"/remembered", b"app.example.com")
    assert normalize_request(b"/remembered", b"app.example.com") is first
    normalize_request(long_target, b"app.example.com")
    assert (long_target, b"app.example.com") not in http_target._normal
    assert len(http_target._normal) <= http_target.MAX_REMEMBERED
