"""``tls.cipherSuites`` of a Gateway server: Go/IANA and OpenSSL names, checked before use.

Istio documents OpenSSL names (``ECDHE-RSA-AES128-GCM-SHA256``, Envoy's spelling); the Go
EdgeMesh read Go's names, which are the IANA ones (``TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256``),
and its own example lists only those. Both are accepted here. ``choose`` sorts what a server
lists into the OpenSSL cipher string to set and what it cannot honour:

- an unknown name, or a known one this OpenSSL build lacks (RC4, 3DES), is reported and
  left out — never silently;
- TLS 1.3 suites (``TLS_AES_128_GCM_SHA256``, ...) cannot be restricted through Python's
  ``ssl``: OpenSSL always enables all three, so naming them is accepted and changes nothing
  (the TLS 1.2 suites stay as listed, or OpenSSL's defaults if none is);
- when nothing usable is left, the OpenSSL defaults are used (as Go falls back to its
  defaults) and that is reported: a server never ends up with no cipher at all.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

# Go's crypto/tls names (pkg/gateway/tls.go of the Go EdgeMesh) → OpenSSL's
GO_TO_OPENSSL = {
    "TLS_RSA_WITH_RC4_128_SHA": "RC4-SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA": "DES-CBC3-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA": "ECDHE-ECDSA-RC4-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA": "ECDHE-RSA-RC4-SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA": "ECDHE-RSA-DES-CBC3-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    # Go's legacy spellings, without the _SHA256 suffix
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
TLS13 = frozenset({"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                   "TLS_CHACHA20_POLY1305_SHA256"})


@dataclass(frozen=True)
class CipherChoice:
    """What a server's ``cipherSuites`` come to."""
    openssl: str  # the string for ``SSLContext.set_ciphers``; "" = OpenSSL's defaults
    problems: tuple[str, ...] = ()  # one sentence each, for the log and /debug/gateway


@functools.cache
def available() -> frozenset[str]:
    """The TLS 1.2 suites this OpenSSL build has, by OpenSSL name (``ssl`` is imported here,
    when a Gateway first names cipher suites: a gateway without TLS never loads it)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return frozenset(c["name"] for c in ctx.get_ciphers())


def choose(names: Iterable[str], have: frozenset[str] | None = None) -> CipherChoice:
    """Sort ``names`` into a cipher string and problems (see the module docstring)."""
    have = available() if have is None else have
    chosen: list[str] = []
    problems: list[str] = []
    tls13 = False
    for raw in names:
        name = raw.strip()
        if name.upper() in TLS13:
            tls13 = True  # always on with TLS 1.3 (see the module docstring)
            continue
        openssl = GO_TO_OPENSSL.get(name.upper(), name)
        if openssl in have:
            if openssl not in chosen:
                chosen.append(openssl)
        elif name.upper() in GO_TO_OPENSSL:
            problems.append(f"cipher suite {name} ({openssl}) is not available in this "
                            f"OpenSSL build; left out")
        else:
            problems.append(f"cipher suite {name!r} is unknown (expected a Go/IANA name "
                            f"like TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 or an OpenSSL name "
                            f"like ECDHE-RSA-AES128-GCM-SHA256); left out")
    if problems and not chosen and not tls13:
        problems.append("no listed cipher suite is usable; OpenSSL's default suites are used "
                        "instead")
    return CipherChoice(":".join(chosen), tuple(problems))
