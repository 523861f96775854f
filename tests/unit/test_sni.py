"""SNI from real ClientHellos (made by Python's ssl module), split anywhere, and garbage."""
from __future__ import annotations

import ssl

import pytest

from edgemesh.proxy.tls_sni import NEED_MORE, NOT_TLS, SniStatus, client_hello_sni


def client_hello(server_name: str | None, **ctx_opts: object) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for k, v in ctx_opts.items():
        setattr(ctx, k, v)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("name", ["web.default.svc.cluster.local", "a", "Example.COM"])
def test_name_from_a_real_hello(name: str) -> None:
    hello = client_hello(name)
    result = client_hello_sni(hello)
    assert result.status is SniStatus.FOUND and result.name == name.lower()


def test_hello_without_sni() -> None:
    result = client_hello_sni(client_hello(None))
    assert result.status is SniStatus.FOUND and result.name == ""


def test_tls12_hello() -> None:
    hello = client_hello("old.example", maximum_version=ssl.TLSVersion.TLSv1_2)
    assert client_hello_sni(hello).name == "old.example"


def test_every_prefix_needs_more() -> None:
    hello = client_hello("svc.ns")
    for i in range(len(hello)):
        assert client_hello_sni(hello[:i]) == NEED_MORE, i
    assert client_hello_sni(hello + b"\x17\x03\x03\x00\x05early").name == "svc.ns"


def test_hello_split_over_two_records() -> None:
    hello = client_hello("split.example")
    payload = hello[5:]
    first, second = payload[:40], payload[40:]
    records = b"".join(b"\x16\x03\x01" + len(p).to_bytes(2, "big") + p for p in (first, second))
    assert client_hello_sni(records).name == "split.example"
    assert client_hello_sni(records[:-1]) == NEED_MORE


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"\x16\x02\x00", b"\x16\x03\x01\x00\x00",
                                  b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
                                  b"SSH-2.0-OpenSSH_9\r\n"])
def test_not_tls(data: bytes) -> None:
    assert client_hello_sni(data) == NOT_TLS
