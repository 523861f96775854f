"""Gateway address selection (multi-NIC, IPv4/IPv6) and SSL contexts from Secrets."""
from __future__ import annotations

import datetime
import ssl

import pytest
import yaml

from edgemesh.gateway import ciphers
from edgemesh.gateway.compile import build_table
from edgemesh.gateway.listeners import (
    InterfaceAddress,
    check_ip_lists,
    interface_addresses,
    select_addresses,
)
from edgemesh.gateway.routes import PortKind, ServerRef, TLSMode
from edgemesh.gateway.tls import CredentialError, Credentials, build_context
from edgemesh.meta.istio import ServerTLS, parse_gateway, parse_virtual_service
from edgemesh.meta.models import ObjectMeta, Secret

ADDRS = [InterfaceAddress("lo", "127.0.0.1"), InterfaceAddress("lo", "::1"),
         InterfaceAddress("eth0", "192.168.1.5"), InterfaceAddress("eth0", "fe80::1"),
         InterfaceAddress("eth0", "fd00::5"), InterfaceAddress("eth1", "10.0.0.5"),
         InterfaceAddress("eth1", "10.0.1.5")]


def test_interface_addresses_from_the_one_reader() -> None:
    found = {"eth0": {"fd00::1", "10.1.2.3"}, "can0": set()}
    assert interface_addresses(found) == [InterfaceAddress("eth0", "10.1.2.3"),
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
    # MUTUAL without a CA runs as SIMPLE (the Go example's case); the module warns
    assert build_context({"tls.crt": crt, "tls.key": key}, TLSMode.MUTUAL).verify_mode == \
        ssl.CERT_NONE
    with pytest.raises(CredentialError):
        build_context({"tls.crt": crt, "tls.key": b"garbage"}, TLSMode.SIMPLE)


def test_private_key_never_written_to_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile
    written: list[str] = []
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: written.append("mkstemp"))
    crt, key = _cert("a.example.com")
    ctx = build_context({"tls.crt": crt, "tls.key": key}, TLSMode.SIMPLE)
    assert ctx.get_ca_certs() == [] and written == []
    with pytest.raises(CredentialError):  # a bad key is still reported from the memory file
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


def test_client_certificates_when_a_ca_is_there() -> None:
    crt, key = _cert("kubeedge.io")
    with_ca = {"tls.crt": crt, "tls.key": key, "ca.crt": crt}
    # Istio SIMPLE never asks (cert-manager Secrets carry ca.crt); Go's shape always does
    assert build_context(with_ca, TLSMode.SIMPLE).verify_mode == ssl.CERT_NONE
    assert build_context(with_ca, TLSMode.SIMPLE, go_compat=True).verify_mode == \
        ssl.CERT_REQUIRED
    assert build_context({"tls.crt": crt, "tls.key": key}, TLSMode.SIMPLE,
                         go_compat=True).verify_mode == ssl.CERT_NONE
    # the CA may live in <name>-cacert (Istio's second form)
    assert build_context({"tls.crt": crt, "tls.key": key}, TLSMode.MUTUAL,
                         ca_data={"cacert": crt}).verify_mode == ssl.CERT_REQUIRED


def test_credentials_mutual_without_ca_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    crt, key = _cert("kubeedge.io")
    secret = Secret(ObjectMeta("gw-secret", "default"), "kubernetes.io/tls",
                    {"tls.crt": crt, "tls.key": key})
    creds = Credentials(lambda ns, name: secret if name == "gw-secret" else None)
    server = ServerRef("default/edgemesh-gateway", "default", 0, "HTTPS", ("*",),
                       ServerTLS(mode="MUTUAL", credential_name="gw-secret", go_compat=True))
    creds.context_for(server)
    creds.context_for(server)
    warned = [r for r in caplog.records if "running as SIMPLE" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"


GO_SUITES = ("TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
             "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
             "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
             "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA", "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
             "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256", "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256")


def test_cipher_suites_go_and_openssl_names() -> None:
    """The Go example's list maps one to one; OpenSSL names pass through."""
    choice = ciphers.choose(GO_SUITES)
    assert choice.problems == ()
    assert choice.openssl.split(":")[:2] == ["ECDHE-ECDSA-AES256-SHA",
                                             "ECDHE-ECDSA-AES256-GCM-SHA384"]
    assert len(choice.openssl.split(":")) == len(GO_SUITES)
    assert ciphers.choose(["ECDHE-RSA-AES128-GCM-SHA256",
                           "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"]).openssl == \
        "ECDHE-RSA-AES128-GCM-SHA256"
    ctx = build_context({"tls.crt": _rsa_cert()[0], "tls.key": _rsa_cert()[1]},
                        TLSMode.SIMPLE, "TLSV1_2", "TLSV1_2", GO_SUITES)
    assert {c["name"] for c in ctx.get_ciphers()} - ciphers.TLS13 == \
        set(choice.openssl.split(":"))


def test_cipher_suites_unknown_or_missing_are_reported_never_empty() -> None:
    have = frozenset({"ECDHE-RSA-AES128-GCM-SHA256"})
    choice = ciphers.choose(["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "BOGUS",
                             "TLS_RSA_WITH_RC4_128_SHA"], have)
    assert choice.openssl == "ECDHE-RSA-AES128-GCM-SHA256"
    assert len(choice.problems) == 2
    assert "'BOGUS' is unknown" in choice.problems[0]
    assert "RC4-SHA) is not available" in choice.problems[1]
    nothing = ciphers.choose(["BOGUS"], have)
    assert nothing.openssl == "" and "default suites are used" in nothing.problems[-1]
    # TLS 1.3 suites are always on: naming them is fine and changes nothing
    assert ciphers.choose(["TLS_AES_128_GCM_SHA256"], have) == ciphers.CipherChoice("")
    assert ciphers.choose([], have) == ciphers.CipherChoice("")


def test_go_shaped_server_terminates_tls_whatever_its_protocol_says() -> None:
    gateway = parse_gateway(yaml.safe_load(GO_TLS_GATEWAY))
    route = parse_virtual_service(yaml.safe_load(GO_TLS_VS))
    table = build_table([gateway], [route], LABELS)
    spec = table.ports[23333]
    assert spec.kind is PortKind.TLS
    (server,) = spec.servers
    assert (server.protocol, server.mode, server.tls.go_compat) == ("HTTPS", TLSMode.MUTUAL,
                                                                    True)
    assert spec.http[0].routes_for("192.168.0.211")[0].targets[0].name == "hostname-lb-svc"
    assert len(table.problems) == 2
    assert "port.protocol HTTP disagrees with tls.credentialName gw-secret" in \
        table.problems[0]
    assert "'NOT_A_SUITE' is unknown" in table.problems[1]
    # a TCP server: TLS terminated, then the tcp route
    tcp = parse_gateway(yaml.safe_load(GO_TLS_GATEWAY.replace("HTTP\n", "TCP\n")))
    assert build_table([tcp], [], LABELS).ports[23333].servers[0].protocol == "TLS"
    # Istio's httpsRedirect server keeps its meaning
    redirect = parse_gateway(yaml.safe_load(GO_TLS_GATEWAY.replace(
        "mode: MUTUAL", "httpsRedirect: true")))
    assert build_table([redirect], [], LABELS).ports[23333].kind is PortKind.HTTP


LABELS = {"kubeedge": "edgemesh-gateway"}
GO_TLS_GATEWAY = """
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {name: edgemesh-gateway, namespace: default}
spec:
  selector: {kubeedge: edgemesh-gateway}
  servers:
    - hosts: ['*']
      port:
        name: http-0
        number: 23333
        protocol: HTTP
      tls:
        cipherSuites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, NOT_A_SUITE]
        credentialName: gw-secret
        maxProtocolVersion: TLSV1_2
        minProtocolVersion: TLSV1_2
        mode: MUTUAL
"""
GO_TLS_VS = """
metadata: {name: edgemesh-gateway-svc, namespace: default}
spec:
  gateways: [edgemesh-gateway]
  hosts: ['*']
  http:
    - match: [{uri: {prefix: /}}]
      route: [{destination: {host: hostname-lb-svc, port: {number: 12345}}}]
"""


def _rsa_cert() -> tuple[bytes, bytes]:
    if not _RSA:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
        key = rsa.generate_private_key(65537, 2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubeedge.io")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(1)
                .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .sign(key, hashes.SHA256()))
        _RSA.extend([cert.public_bytes(serialization.Encoding.PEM),
                     key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())])
    return _RSA[0], _RSA[1]


_RSA: list[bytes] = []
