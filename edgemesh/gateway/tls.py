"""TLS for gateway servers: SSL contexts from Secrets, rebuilt when a Secret changes.

A server's ``tls.credentialName`` names a Secret in the Gateway's own namespace (the gateway
reads no other Secrets): ``tls.crt`` (chain) and ``tls.key``, and the client CA in ``ca.crt``
of the same Secret or of ``<credentialName>-cacert`` (Istio's two forms). Contexts are built
on first use and kept while the store holds the same Secret object, so a changed Secret is
picked up by the next connection and established ones keep their session.

Policy: TLS 1.2 at least (``minProtocolVersion`` may raise it, never lower it);
``maxProtocolVersion`` honoured; ``cipherSuites`` in Go/IANA or OpenSSL names (``ciphers.py``:
unknown names are reported by the route compiler and left out). ALPN offers ``http/1.1`` for
HTTPS servers.

Client certificates:
- ``MUTUAL`` (and ``OPTIONAL_MUTUAL``, treated as mutual) requires one issued by the CA;
  without a CA it is logged as a warning and the server runs as ``SIMPLE`` — the Go
  EdgeMesh's own HTTPS example says ``MUTUAL`` with a ``kubectl create secret tls`` Secret;
- a server in the Go EdgeMesh's shape (``protocol: HTTP`` or ``TCP`` with a credentialName,
  ``ServerTLS.go_compat``) requires one whenever a CA is there, whatever its mode, as Go does;
- an Istio ``SIMPLE`` server (``HTTPS``/``TLS``) never asks for one, even if the Secret
  carries ``ca.crt`` (cert-manager puts one in every Secret it issues).
"""
from __future__ import annotations

import logging
import os
import ssl
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgemesh.errors import EdgeMeshError
from edgemesh.gateway.ciphers import choose
from edgemesh.gateway.compile import selects
from edgemesh.gateway.routes import ServerRef, TLSMode
from edgemesh.meta.istio import Gateway
from edgemesh.runtime.logs import Once

log = logging.getLogger(__name__)
_once = Once()

_VERSIONS = {"TLSV1_2": ssl.TLSVersion.TLSv1_2, "TLSV1_3": ssl.TLSVersion.TLSv1_3}


def secret_namespaces(gateways: Iterable[Gateway], labels: Mapping[str, str]) -> set[str]:
    """The namespaces whose Secrets a gateway with ``labels`` reads: those of the Gateways that
    select it and name a ``tls.credentialName`` (the kube source watches Secrets there only)."""
    return {g.meta.namespace for g in gateways if selects(g, labels) and
            any(s.tls is not None and s.tls.credential_name for s in g.servers)}


class CredentialError(EdgeMeshError):
    """A server's TLS credential is missing or unusable (the operator's to fix)."""


@dataclass
class _Entry:
    secrets: tuple[Any, ...]  # the Secret objects the context was built from
    context: ssl.SSLContext


class Credentials:
    """SSL contexts for servers, keyed by their settings, checked against the store's Secrets."""

    def __init__(self, get_secret: Any) -> None:
        self._get_secret = get_secret  # (namespace, name) -> Secret | None
        self._cache: dict[tuple[Any, ...], _Entry] = {}

    def context_for(self, server: ServerRef) -> ssl.SSLContext:
        """The context for ``server``; raises ``CredentialError``."""
        tls = server.tls
        if tls is None or not tls.credential_name:
            raise CredentialError(f"{server.gateway}: tls.credentialName is required")
        mode = server.mode or TLSMode.SIMPLE
        secret = self._get_secret(server.namespace, tls.credential_name)
        if secret is None:
            raise CredentialError(f"Secret {server.namespace}/{tls.credential_name} not found")
        ca_secret = None
        if (mode is TLSMode.MUTUAL or tls.go_compat) and "ca.crt" not in secret.data:
            ca_secret = self._get_secret(server.namespace, tls.credential_name + "-cacert")
        key = (server.namespace, tls.credential_name, mode, tls.min_protocol_version,
               tls.max_protocol_version, tls.cipher_suites, server.protocol, tls.go_compat)
        entry = self._cache.get(key)
        if entry is not None and entry.secrets[0] is secret and entry.secrets[1] is ca_secret:
            return entry.context
        ca_data = ca_secret.data if ca_secret is not None else None
        if mode is TLSMode.MUTUAL and client_ca(secret.data, ca_data) is None and \
                _once(("mutual-no-ca", server.gateway, server.index, id(secret))):
            log.warning("gateway %s servers[%d]: tls.mode MUTUAL but neither Secret %s/%s nor "
                        "%s-cacert holds a ca.crt: running as SIMPLE (no client certificate "
                        "asked for)", server.gateway, server.index, server.namespace,
                        tls.credential_name, tls.credential_name)
        context = build_context(secret.data, mode, tls.min_protocol_version,
                                tls.max_protocol_version, tls.cipher_suites, ca_data,
                                alpn=server.protocol == "HTTPS", go_compat=tls.go_compat)
        self._cache[key] = _Entry((secret, ca_secret), context)
        return context

    def forget_others(self, keep: set[tuple[str, str]]) -> None:
        """Drop contexts of Secrets no server names any more."""
        for key in [k for k in self._cache if (k[0], k[1]) not in keep]:
            del self._cache[key]


def client_ca(data: dict[str, bytes], ca_data: dict[str, bytes] | None) -> bytes | None:
    """The client CA (PEM) from the Secret's ``ca.crt`` or the ``-cacert`` Secret's."""
    extra = ca_data or {}
    return data.get("ca.crt") or extra.get("ca.crt") or extra.get("cacert") or None


def build_context(data: dict[str, bytes], mode: TLSMode, min_version: str = "",
                  max_version: str = "", ciphers: tuple[str, ...] = (),
                  ca_data: dict[str, bytes] | None = None, alpn: bool = True,
                  go_compat: bool = False) -> ssl.SSLContext:
    """A server context from a kubernetes.io/tls Secret's data; raises ``CredentialError``.

    A client certificate is required when a CA is there and the mode is ``MUTUAL`` or the
    server has the Go EdgeMesh's shape (``go_compat``); see the module docstring.
    """
    cert, key = data.get("tls.crt"), data.get("tls.key")
    if not cert or not key:
        raise CredentialError("the Secret needs tls.crt and tls.key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = max(ssl.TLSVersion.TLSv1_2,
                              _VERSIONS.get(min_version.upper(), ssl.TLSVersion.TLSv1_2))
    if max_version.upper() in _VERSIONS:
        ctx.maximum_version = _VERSIONS[max_version.upper()]
    try:
        suites = choose(ciphers).openssl
        if suites:
            ctx.set_ciphers(suites)
        _load_chain(ctx, cert, key)
        ca = client_ca(data, ca_data)
        if ca is not None and (mode is TLSMode.MUTUAL or go_compat):
            ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, ValueError) as e:
        raise CredentialError(f"unusable certificate, key or CA: {e}") from e
    if alpn:
        ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """``load_cert_chain`` reads files only (pyOpenSSL would take the PEM from memory, but its
    connections are not the ``ssl`` sockets gevent serves): hand it an anonymous in-memory
    file, so the private key never reaches a disk; a private temporary file where the kernel
    has no ``memfd_create``."""
    pem = key.rstrip(b"\n") + b"\n" + cert
    try:
        fd = os.memfd_create("edgemesh-gw-cert", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="edgemesh-gw-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp creates it 0600
            f.write(pem)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)
