"""Gateway address selection (multi-NIC, IPv4/IPv6) and SSL contexts from Secrets."""
from __future__ import annotations

import datetime
import json
import ssl

import pytest

from edgemesh.gateway.listeners import (
    InterfaceAddress,
    check_ip_lists,
    parse_ip_addr,
    select_addresses,
)
from edgemesh.gateway.routes import ServerRef, TLSMode
from edgemesh.gateway.tls import CredentialError, Credentials, build_context
from edgemesh.meta.istio import ServerTLS
from edgemesh.meta.models import ObjectMeta, Secret

ADDRS = [InterfaceAddress("lo", "127.0.0.1"), InterfaceAddress("lo", "::1"),
         InterfaceAddress("eth0", "192.168.1.5"), InterfaceAddress("eth0", "fe80::1"),
         InterfaceAddress("eth0", "fd00::5"), InterfaceAddress("eth1", "10.0.0.5"),
         InterfaceAddress("eth1", "10.0.1.5")]


def test_parse_ip_addr_json() -> None:
    text = json.dumps([{"ifname": "eth0", "addr_info": [
        {"family": "inet", "local": "10.1.2.3", "prefixlen": 24},
        {"family": "inet6", "local": "fd00::1", "prefixlen": 64}]},
        {"ifname": "can0", "addr_info": []}])
    assert parse_ip_addr(text) == [InterfaceAddress("eth0", "10.1.2.3"),
                                   InterfaceAddress("eth0", "fd00::1")]


def test_select_all_skips_ipv6_link_local() -> None:
    assert select_addresses(ADDRS, "*", "*", "*") == [
        "10.0.0.5", "10.0.1.5", "127.0.0.1", "192.168.1.5", "::1", "fd00::5"]


def test_select_by_nic_include_and_exclude() -> None:
    assert select_addresses(ADDRS, "eth0", "*", "*") == ["192.168.1.5", "fd00::5"]
    assert select_addresses(ADDRS, "eth0,eth1", "10.0.0.0/16,fd00::/8", "10.0.1.5") == [
        "10.0.0.5", "fd00::5"]
    assert select_addresses(ADDRS, "*", "192.168.1.5", "") == ["192.168.1.5"]


def test_bad_ip_lists_reported() -> None:
    assert check_ip_lists("*", "*") == ""
    assert "includeIP" in check_ip_lists("10.0.0.0/33", "*")


def _cert(cn: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def test_context_minimum_tls12_and_mutual() -> None:
    crt, key = _cert("a.example.com")
    ctx = build_context({"tls.crt": crt, "tls.key": key}, TLSMode.SIMPLE, "TLSV1_0")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    ctx = build_context({"tls.crt": crt, "tls.key": key, "ca.crt": crt}, TLSMode.MUTUAL,
                        "TLSV1_3")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(CredentialError):
        build_context({"tls.crt": crt, "tls.key": key}, TLSMode.MUTUAL)
    with pytest.raises(CredentialError):
        build_context({"tls.crt": crt, "tls.key": b"garbage"}, TLSMode.SIMPLE)


def test_credentials_reload_when_the_secret_changes() -> None:
    secrets: dict[tuple[str, str], Secret] = {}

    def put(cn: str) -> None:
        crt, key = _cert(cn)
        secrets[("edge", "cert")] = Secret(ObjectMeta("cert", "edge"), "kubernetes.io/tls",
                                           {"tls.crt": crt, "tls.key": key})
    creds = Credentials(lambda ns, name: secrets.get((ns, name)))
    server = ServerRef("edge/web", "edge", 0, "HTTPS", ("*",),
                       ServerTLS(mode="SIMPLE", credential_name="cert"))
    with pytest.raises(CredentialError, match="not found"):
        creds.context_for(server)
    put("one")
    first = creds.context_for(server)
    assert creds.context_for(server) is first  # cached while the Secret is the same
    put("two")
    assert creds.context_for(server) is not first
    other_ns = ServerRef("other/web", "other", 0, "HTTPS", ("*",),
                         ServerTLS(mode="SIMPLE", credential_name="cert"))
    with pytest.raises(CredentialError):  # only the Gateway's own namespace is read
        creds.context_for(other_ns)
