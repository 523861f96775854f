"""HTTP probes as data: the exact bytes an attacker sends, where the attack comes from, and which
outcomes are safe. ``tests/probe_runner.py`` sends them; ``tests/e2e/test_http_probes.py`` runs
them against our gateway and per-request proxy; ``bench/http_probes.py`` against nginx and
haproxy too.

Every probe talks to ``app.example.com`` (routes: ``/admin`` prefix denied with 403, the rest to
the recording backend), ``*.example.com`` (everything to the backend, no deny) or an unknown
host (404). Besides its own outcomes, every probe must pass the checks every probe gets
(``probe_runner.judge``): another client is answered promptly meanwhile, the backend parsed
everything strictly, every request the backend answered was relayed to the client that sent
it, a victim on another connection gets its own answer, no ``101`` unless asked for, and (on
front ends with routes) the denied path never reached the backend in any spelling.

References (short names used in ``ref``):
  RFC9110, RFC9112 — HTTP Semantics, HTTP/1.1 (2022), with section numbers.
  Kettle2019 — James Kettle, "HTTP Desync Attacks: Request Smuggling Reborn", Black Hat 2019.
  Kettle2021 — James Kettle, "HTTP/2: The Sequel is Always Worse", Black Hat 2021.
  Kettle2022 — James Kettle, "Browser-Powered Desync Attacks" (client-side desync, early answers).
  BishopFox2020 — Jake Miller, "h2c Smuggling: Request Smuggling Via HTTP/2 Cleartext", 2020.
  Tsai2018 — Orange Tsai, "Breaking Parser Logic", Black Hat 2018.
  Klein2020 — Amit Klein, "HTTP Request Smuggling in 2020", Black Hat 2020.
  Linhart2005 — Linhart, Klein, Heled, Orrin, "HTTP Request Smuggling", Watchfire 2005.
  Egorov2019 — Mikhail Egorov, "What's wrong with WebSocket APIs? Unveiling vulnerabilities in
    WebSocket APIs" (0ang3el websocket smuggling), 2019.
  Issue13 — this project's issue #13, where the finding was made.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Kind(enum.Enum):
    """The attack class a probe belongs to."""
    CONTROL = "control"
    FRAMING = "framing"
    CL_TE = "CL.TE"
    TE_CL = "TE.CL"
    TE_TE = "TE.TE"
    H2C = "h2c"
    UPGRADE = "upgrade"
    EXPECT = "expect-bleed"
    PATH = "path-normalisation"
    AUTHORITY = "authority"
    HOST = "host"
    VERSION = "version-target"
    CHUNK = "chunk-syntax"
    HEADER = "header-syntax"
    PIPELINE = "pipeline"
    REDOS = "redos"
    LIMITS = "limits"


@dataclass(frozen=True)
class Want:
    """A request the backend must have seen: method, target, body, and optionally its Host and
    header names that must have been stripped."""
    method: str
    target: str
    body: bytes = b""
    host: str | None = None
    absent: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """One safe result. ``statuses``: the first final status the probe's client gets (0: the
    connection closed without an answer; empty: any). ``seen``: exactly the requests (from the
    probe's connection) the backend saw complete; None: not checked."""
    label: str
    statuses: frozenset[int] = frozenset()
    seen: tuple[Want, ...] | None = None


@dataclass(frozen=True)
class Probe:
    """One attack: ``writes`` are sent on one connection, ``pause`` seconds apart; ``victim``
    (if any) is sent on another connection after them."""
    name: str
    kind: Kind
    writes: tuple[bytes, ...]
    ref: str
    safe: tuple[Outcome, ...]
    pause: float = 0.0
    victim: bytes | None = None
    routes: bool = False  # needs host/path routes: gateway, nginx, haproxy, not the agent
    timeout: float = 3.0
    allow_101: bool = False
    tags: frozenset[str] = field(default_factory=frozenset)


def rejected(*codes: int) -> Outcome:
    """Refused (400 unless codes say otherwise); the backend saw no request from it."""
    codes = codes or (400,)
    return Outcome(f"rejected {'/'.join(map(str, codes))}", frozenset(codes), ())


def forwarded(*wants: Want) -> Outcome:
    """Forwarded as exactly these requests, the first answered 200."""
    what = ", ".join(f"{w.method} {w.target} body {w.body[:20]!r}" for w in wants)
    return Outcome(f"forwarded as {what}", frozenset({200}), wants)


def answered(*codes: int) -> Outcome:
    """Answered with one of ``codes``; the backend may or may not have seen it (the checks
    every probe gets decide)."""
    return Outcome(f"answered {'/'.join(map(str, codes))}", frozenset(codes), None)


DENIED = Outcome("denied 403 by the route", frozenset({403}), ())
KEPT_OUT = answered(200, 400, 403, 404, 414, 301, 302, 308)  # the deny check decides
ANY = Outcome("any answer (the checks every probe gets decide)")

H = b"Host: app.example.com\r\n"
GET_X = b"GET /x HTTP/1.1\r\n" + H + b"\r\n"
VICTIM = b"GET /victim HTTP/1.1\r\nHost: app.example.com\r\n\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: app.example.com\r\n\r\n"
CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"
REJECT = rejected(400)
TE_REJECT = rejected(400, 422, 501)
TO_APP = forwarded(Want("GET", "/x", host="app.example.com"))  # re-written to a valid Host
HELLO = Want("POST", "/x", b"hello")
POST_HELLO = forwarded(HELLO)


def post(fields: bytes, body: bytes, target: bytes = b"/x", version: bytes = b"1.1") -> bytes:
    """``POST target`` with the Host field, ``fields`` (each ending CRLF), then ``body``."""
    return b"POST " + target + b" HTTP/" + version + b"\r\n" + H + fields + b"\r\n" + body


def get(target: bytes, fields: bytes = H, method: bytes = b"GET",
        version: bytes = b"1.1") -> bytes:
    return method + b" " + target + b" HTTP/" + version + b"\r\n" + fields + b"\r\n"


def _p(name: str, kind: Kind, writes: bytes | tuple[bytes, ...], ref: str,
       *safe: Outcome, **kw: object) -> Probe:
    if isinstance(writes, bytes):
        writes = (writes,)
    return Probe(name, kind, writes, ref, safe, **kw)  # type: ignore[arg-type]


# ---- framing: Content-Length --------------------------------------------------------------

def _framing() -> list[Probe]:
    k, ref = Kind.FRAMING, "RFC9112 6.3; RFC9110 8.6"
    out = [
        _p("control-get", Kind.CONTROL, GET_X, "RFC9112 3", forwarded(Want("GET", "/x"))),
        _p("control-post-length", Kind.CONTROL, post(b"Content-Length: 5\r\n", b"hello"),
           "RFC9112 6.2", POST_HELLO),
        _p("control-post-chunked", Kind.CONTROL,
           post(b"Transfer-Encoding: chunked\r\n", CHUNKED_HELLO), "RFC9112 7.1", POST_HELLO),
        _p("cl-duplicate-same", k, post(b"Content-Length: 5\r\nContent-Length: 5\r\n",
                                        b"hello"), ref + "; Issue13", REJECT, POST_HELLO),
        _p("cl-list-same", k, post(b"Content-Length: 5, 5\r\n", b"hello"), ref + "; Issue13",
           REJECT, POST_HELLO),
        _p("cl-duplicate-differ", k, post(b"Content-Length: 5\r\nContent-Length: 6\r\n",
                                          b"hello!" + SMUGGLED), ref + "; Linhart2005", REJECT),
        _p("cl-list-differ", k, post(b"Content-Length: 5, 6\r\n", b"hello!"), ref, REJECT),
        _p("cl-list-trailing-comma", k, post(b"Content-Length: 5,\r\n", b"hello"), ref,
           REJECT, POST_HELLO),
        _p("cl-plus-sign", k, post(b"Content-Length: +5\r\n", b"hello"), ref, REJECT),
        _p("cl-negative", k, post(b"Content-Length: -1\r\n", b"hello"), ref, REJECT),
        _p("cl-hex", k, post(b"Content-Length: 0x5\r\n", b"hello"), ref, REJECT),
        _p("cl-space-inside", k, post(b"Content-Length: 5 5\r\n", b"hello"), ref, REJECT),
        _p("cl-empty", k, post(b"Content-Length: \r\n", b"hello"), ref, REJECT),
        _p("cl-20-digits-wraps", k, post(b"Content-Length: 18446744073709551621\r\n",
                                         b"hello" + SMUGGLED),
           ref + "; Issue13 (2**64+5 wraps to 5 in a u64)", rejected(400, 413)),
        _p("cl-2-pow-63", k, post(b"Content-Length: 9223372036854775808\r\n", b"hello"),
           ref + "; Issue13", rejected(400, 413)),
        _p("cl-20-digits-leading-zeros", k,
           post(b"Content-Length: 00000000000000000005\r\n", b"hello"), ref + "; Issue13",
           REJECT, rejected(413), POST_HELLO),
        _p("cl-on-get", k, get(b"/x", H + b"Content-Length: 5\r\n") + b"hello", "RFC9110 9.3.1",
           forwarded(Want("GET", "/x", b"hello")), REJECT),
        _p("cl-connection-strips-it", k,
           post(b"Content-Length: 5\r\nConnection: Content-Length\r\n", b"hello"),
           "RFC9110 7.6.1 (hop-by-hop names); Kettle2022", REJECT, POST_HELLO),
        _p("te-connection-strips-it", k,
           post(b"Transfer-Encoding: chunked\r\nConnection: Transfer-Encoding\r\n",
                CHUNKED_HELLO), "RFC9110 7.6.1", REJECT, POST_HELLO),
        _p("te-on-http10", k, post(b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n",
                                   CHUNKED_HELLO + SMUGGLED, version=b"1.0"),
           "RFC9112 6.1 (faulty framing, then close); Issue13", TE_REJECT, POST_HELLO),
        _p("te-and-cl-on-http10", k, post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                                          CHUNKED_HELLO, version=b"1.0"), "RFC9112 6.1",
           TE_REJECT, POST_HELLO),
        _p("te-identity", k, post(b"Transfer-Encoding: identity\r\n", b"hello"),
           "RFC9112 6.1; RFC9110 (identity dropped)", rejected(400, 501)),
        _p("te-chunked-not-last", k, post(b"Transfer-Encoding: chunked, gzip\r\n",
                                          CHUNKED_HELLO), "RFC9112 6.3 (item 4)",
           rejected(400, 501)),
        _p("te-chunked-twice", k, post(b"Transfer-Encoding: chunked, chunked\r\n",
                                       CHUNKED_HELLO), "RFC9112 7 (chunked only once)",
           rejected(400, 501)),
    ]
    return out


# ---- CL.TE, TE.CL, TE.TE --------------------------------------------------------------------

TE_OBFUSCATIONS: tuple[tuple[str, bytes], ...] = (
    ("plain", b"Transfer-Encoding: chunked\r\n"),
    ("xchunked", b"Transfer-Encoding: xchunked\r\n"),
    ("space-before-colon", b"Transfer-Encoding : chunked\r\n"),
    ("tab-before-value", b"Transfer-Encoding:\tchunked\r\n"),
    ("vtab-before-value", b"Transfer-Encoding:\x0bchunked\r\n"),
    ("formfeed-before-value", b"Transfer-Encoding:\x0cchunked\r\n"),
    ("chunked-then-x", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n"),
    ("x-then-chunked", b"Transfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n"),
    ("quoted", b'Transfer-Encoding: "chunked"\r\n'),
    ("uppercase-value", b"Transfer-Encoding: CHUNKED\r\n"),
    ("lowercase-name", b"transfer-encoding: chunked\r\n"),
    ("identity-chunked", b"Transfer-Encoding: identity, chunked\r\n"),
    ("gzip-chunked", b"Transfer-Encoding: gzip, chunked\r\n"),
    ("leading-comma", b"Transfer-Encoding: , chunked\r\n"),
    ("chunked-parameter", b"Transfer-Encoding: chunked; q=1\r\n"),
    ("obs-fold-value", b"Transfer-Encoding:\r\n chunked\r\n"),
    ("obs-fold-name", b"X-Pad: y\r\n Transfer-Encoding: chunked\r\n"),
    ("bare-lf-before", b"X-Pad: y\nTransfer-Encoding: chunked\r\n"),
    ("bare-cr-inside", b"Transfer-Encoding: chun\rked\r\n"),
    ("underscore-name", b"Transfer_Encoding: chunked\r\n"),
    ("nul-after-value", b"Transfer-Encoding: chunked\x00\r\n"),
    ("nbsp-before-value", b"Transfer-Encoding: \xa0chunked\r\n"),
    ("long-ows", b"Transfer-Encoding:" + b" " * 200 + b"chunked\r\n"),
    ("name-suffix", b"Transfer-Encoding-X: chunked\r\n"),
    ("lf-only-line", b"Transfer-Encoding: chunked\n"),
)


# obfuscations the TE-alone series leaves out: their with-Content-Length probes cover them
ALONE_SKIPPED = ("tab-before-value", "lowercase-name", "leading-comma", "long-ows",
                 "chunked-then-x", "formfeed-before-value", "lf-only-line")


def _smuggling() -> list[Probe]:
    out = []
    # CL.TE: a front end reading Content-Length passes "0\r\n\r\nGET /smuggled..." as the body,
    # a back end reading chunked sees an empty body and then a second request.
    clte_body = b"0\r\n\r\n" + SMUGGLED
    whole = Want("POST", "/x", clte_body)
    as_chunked = (Want("POST", "/x"), Want("GET", "/smuggled"))
    for label, te in TE_OBFUSCATIONS:
        k = Kind.CL_TE if label == "plain" else Kind.TE_TE
        out.append(_p(f"clte-{label}", k,
                      post(b"Content-Length: %d\r\n" % len(clte_body) + te, clte_body),
                      "Kettle2019; RFC9112 6.1, 6.3", TE_REJECT, forwarded(whole),
                      forwarded(*as_chunked), forwarded(as_chunked[0]), victim=VICTIM))
    # TE.CL: a front end reading chunked, a back end reading Content-Length: 4 ("5c\r\n").
    inner = b"GPOST /smuggled HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 15\r\n\r\nx="
    tecl_body = b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n"
    for label, te in TE_OBFUSCATIONS[:6]:
        k = Kind.TE_CL if label == "plain" else Kind.TE_TE
        out.append(_p(f"tecl-{label}", k, post(te + b"Content-Length: 4\r\n", tecl_body),
                      "Kettle2019; RFC9112 6.1", TE_REJECT,
                      forwarded(Want("POST", "/x", inner)), victim=VICTIM))
    # TE alone, obfuscated: the front end must either read it as chunked or refuse it.
    # not read as chunked, the body then refused as the next request: one reading end to end
    ignored = forwarded(Want("POST", "/x"))
    for label, te in TE_OBFUSCATIONS[1:]:
        if label in ALONE_SKIPPED:
            continue
        out.append(_p(f"te-alone-{label}", Kind.TE_TE, post(te, CHUNKED_HELLO),
                      "Kettle2019; Klein2020; RFC9112 6.1, 5.2", TE_REJECT,
                      POST_HELLO, ignored, victim=VICTIM))
    return out


# ---- chunk syntax ---------------------------------------------------------------------------

def _chunks() -> list[Probe]:
    k, ref = Kind.CHUNK, "RFC9112 7.1"
    te = b"Transfer-Encoding: chunked\r\n"

    def ch(body: bytes) -> bytes:
        return post(te, body)
    return [
        _p("chunk-17-hex-digits", k, ch(b"10000000000000005\r\nhello\r\n0\r\n\r\n"),
           ref + "; Issue13 (2**64+5 wraps to 5)", rejected(400, 413)),
        _p("chunk-16-hex-ffff", k, ch(b"ffffffffffffffff\r\nhello\r\n0\r\n\r\n"), ref,
           rejected(400, 413)),
        _p("chunk-leading-zeros", k, ch(b"0000000000000005\r\nhello\r\n0\r\n\r\n"), ref,
           REJECT, POST_HELLO),
        _p("chunk-ext-nul", k, ch(b"5;a=\x00\r\nhello\r\n0\r\n\r\n"),
           ref + ".1 (chunk-ext); Issue13", REJECT, POST_HELLO),
        _p("chunk-ext-ok", k, ch(b"5;name=value\r\nhello\r\n0\r\n\r\n"), ref + ".1",
           POST_HELLO),
        _p("chunk-ext-quoted", k, ch(b'5;a="b c"\r\nhello\r\n0\r\n\r\n'), ref + ".1",
           POST_HELLO, REJECT),
        _p("chunk-ext-bare-lf", k, ch(b"5;a\nb\r\nhello\r\n0\r\n\r\n"), ref + ".1; Kettle2019",
           REJECT),
        _p("chunk-size-trailing-space", k, ch(b"5 \r\nhello\r\n0\r\n\r\n"), ref, REJECT,
           POST_HELLO),
        _p("chunk-size-bare-lf", k, ch(b"5\nhello\r\n0\r\n\r\n"), ref + "; Klein2020", REJECT,
           POST_HELLO),
        _p("chunk-data-longer-than-size", k, ch(b"3\r\nhello\r\n0\r\n\r\n"), ref, REJECT),
        _p("chunk-data-no-crlf", k, ch(b"5\r\nhelloXX0\r\n\r\n"), ref, REJECT),
        _p("chunk-data-bare-lf", k, ch(b"5\r\nhello\n0\r\n\r\n"), ref, REJECT, POST_HELLO),
        _p("chunk-negative-size", k, ch(b"-5\r\nhello\r\n0\r\n\r\n"), ref, REJECT),
        _p("chunk-0x-prefix", k, ch(b"0x5\r\nhello\r\n0\r\n\r\n"), ref, REJECT),
        _p("chunk-malformed-with-head", k, ch(b"zz\r\nhello\r\n0\r\n\r\n"),
           ref + "; Issue13 (traceback per request)", REJECT),
        _p("chunk-malformed-mid-stream", k,
           (post(te, b"5\r\nhello\r\n"), b"zz\r\nhello\r\n0\r\n\r\n"),
           ref + "; Issue13 (502 blamed the endpoint)", REJECT, pause=0.3),
        _p("chunk-trailer-ok", k, ch(b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"), ref + ".2",
           POST_HELLO),
        _p("chunk-trailer-malformed", k, ch(b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n"),
           ref + ".2", REJECT, POST_HELLO),
        _p("chunk-last-then-smuggled", k, ch(b"0\r\n\r\n" + SMUGGLED), ref,
           forwarded(Want("POST", "/x"), Want("GET", "/smuggled")), victim=VICTIM),
        _p("chunk-ext-long", k, ch(b"5;" + b"a" * 20000 + b"\r\nhello\r\n0\r\n\r\n"),
           ref + ".1 (bounded extensions)", REJECT, rejected(413, 431), POST_HELLO),
    ]


# ---- versions and request-target forms ------------------------------------------------------

def _versions() -> list[Probe]:
    k = Kind.VERSION
    return [
        _p("version-http2-line", k, get(b"/x", version=b"2.0"), "RFC9112 2.3; Issue13",
           rejected(400, 505), forwarded(Want("GET", "/x"))),
        _p("version-http99", k, get(b"/x", version=b"9.9"), "RFC9112 2.3; Issue13",
           rejected(400, 505), forwarded(Want("GET", "/x"))),
        _p("version-http12", k, get(b"/x", version=b"1.2"), "RFC9110 2.5 (higher minor)",
           forwarded(Want("GET", "/x")), rejected(400, 505)),
        _p("version-lowercase", k, b"GET /x http/1.1\r\n" + H + b"\r\n", "RFC9112 2.3",
           REJECT, rejected(505)),
        _p("version-missing-minor", k, b"GET /x HTTP/1\r\n" + H + b"\r\n", "RFC9112 2.3",
           REJECT, rejected(505)),
        _p("version-http09", k, b"GET /x\r\n\r\n", "RFC9112 2.3 (no HTTP/0.9)",
           REJECT, rejected(0, 505)),
        _p("h2-prior-knowledge-preface", k, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
           "RFC9113 3.4; Kettle2021", rejected(400, 505), rejected(0, 404),
           Outcome("speaks HTTP/2 (waits for SETTINGS)", frozenset({-1}), ())),
        _p("line-double-space", k, b"GET  /x HTTP/1.1\r\n" + H + b"\r\n", "RFC9112 3",
           REJECT, forwarded(Want("GET", "/x"))),
        _p("line-tab-separator", k, b"GET\t/x HTTP/1.1\r\n" + H + b"\r\n", "RFC9112 3",
           REJECT, forwarded(Want("GET", "/x"))),
        _p("line-space-in-target", k, b"GET /x y HTTP/1.1\r\n" + H + b"\r\n", "RFC9112 3",
           REJECT),
        _p("line-control-in-target", k, b"GET /x\x01y HTTP/1.1\r\n" + H + b"\r\n",
           "RFC9112 3.2", REJECT),
        _p("line-non-ascii-target", k, b"GET /x\xc3\xa9 HTTP/1.1\r\n" + H + b"\r\n",
           "RFC9112 3.2; RFC3986 2", REJECT),
        _p("line-bad-method-char", k, b"G@T /x HTTP/1.1\r\n" + H + b"\r\n", "RFC9110 9.1",
           REJECT, rejected(405, 501)),
        _p("line-leading-crlf", k, b"\r\n" + GET_X, "RFC9112 2.2 (SHOULD ignore one CRLF)",
           forwarded(Want("GET", "/x")), REJECT),
        _p("target-authority-form", k, get(b"app.example.com:80"), "RFC9112 3.2.3; Issue13",
           REJECT, rejected(405, 501)),
        _p("target-asterisk-get", k, get(b"*"), "RFC9112 3.2.4; Issue13", REJECT),
        _p("target-asterisk-options", k, get(b"*", method=b"OPTIONS"), "RFC9112 3.2.4",
           REJECT, forwarded(Want("OPTIONS", "*")), answered(200, 204, 404, 405)),
        _p("connect-method", k, b"CONNECT app.example.com:443 HTTP/1.1\r\n" + H + b"\r\n",
           "RFC9110 9.3.6", rejected(400, 403, 405, 501)),
        _p("target-fragment", k, get(b"/x#frag"), "RFC9112 3.2 (no fragment)", REJECT,
           forwarded(Want("GET", "/x")), forwarded(Want("GET", "/x#frag"))),
    ]


# ---- Host and absolute-form authority ---------------------------------------------------------

def _hosts() -> list[Probe]:
    k, ka, ref = Kind.HOST, Kind.AUTHORITY, "RFC9112 3.2; RFC3986 3.2"
    admin = b"/admin/x"
    return [
        _p("host-missing", k, b"GET /x HTTP/1.1\r\n\r\n", "RFC9112 3.2 (MUST 400)", REJECT,
           rejected(404)),
        _p("host-duplicate", k, get(b"/x", H + H), "RFC9112 3.2 (MUST 400)", REJECT, TO_APP),
        _p("host-duplicate-differ", k, get(b"/x", H + b"Host: evil.example.net\r\n"),
           "RFC9112 3.2; Kettle2019 (host confusion)", REJECT),
        _p("host-list", k, get(b"/x", b"Host: app.example.com, evil.example.net\r\n"), ref,
           REJECT, rejected(404)),
        _p("host-with-slash", k, get(b"/x", b"Host: a/b.example.com\r\n"), ref + "; Issue13",
           REJECT),
        _p("host-with-space", k, get(b"/x", b"Host: a b.example.com\r\n"), ref + "; Issue13",
           REJECT),
        _p("host-with-userinfo", k, get(b"/x", b"Host: u@app.example.com\r\n"), ref, REJECT,
           TO_APP),
        _p("host-bad-port", k, get(b"/x", b"Host: app.example.com:abc\r\n"), ref, REJECT, TO_APP),
        _p("host-bad-ipv6", k, get(b"/x", b"Host: [::1\r\n"), ref, REJECT, rejected(404)),
        _p("host-wildcard-slash-admin", k, get(admin, b"Host: x/y.example.com\r\n"),
           ref + "; Issue13", REJECT, routes=True),
        _p("host-uppercase-admin", k, get(admin, b"Host: APP.Example.COM\r\n"),
           "RFC9110 4.2.3 (host is case-insensitive)", DENIED, REJECT, routes=True),
        _p("host-port-admin", k, get(admin, b"Host: app.example.com:80\r\n"), ref, DENIED,
           REJECT, rejected(404), routes=True),
        _p("host-trailing-dot-admin", k, get(admin, b"Host: app.example.com.\r\n"), ref,
           DENIED, REJECT, rejected(404), routes=True),
        _p("host-empty-11", k, get(b"/x", b"Host: \r\n"), "RFC9112 3.2 (empty: no authority)",
           REJECT, rejected(404), forwarded(Want("GET", "/x"))),
        _p("abs-admin", ka, get(b"http://app.example.com/admin/x"), "RFC9112 3.2.2; Issue13",
           DENIED, REJECT, routes=True),
        _p("abs-admin-dotdot", ka, get(b"http://app.example.com/admin/.."),
           "RFC9112 3.2.2; RFC3986 5.2.4; Issue13", KEPT_OUT, routes=True),
        _p("abs-admin-host-differs", ka, get(b"http://app.example.com/admin/x",
                                             b"Host: www.example.com\r\n"),
           "RFC9112 3.2.2 (ignore Host); Issue13", DENIED, REJECT, routes=True),
        _p("abs-authority-differs", ka, get(b"http://other.example.net/x"),
           "RFC9112 3.2.2; Issue13", REJECT, rejected(404),
           forwarded(Want("GET", "/x", host="other.example.net"))),
        _p("abs-upper-scheme-admin", ka, get(b"HTTP://app.example.com/admin/x"),
           "RFC3986 3.1 (scheme case-insensitive)", DENIED, REJECT, routes=True),
        _p("abs-unknown-scheme", ka, get(b"ftp://app.example.com/x"), "RFC9112 3.2.2",
           REJECT, rejected(404, 501), TO_APP),
        _p("abs-userinfo", ka, get(b"http://u@app.example.com/x"), "RFC9110 4.2.4",
           REJECT, TO_APP),
        _p("abs-no-path", ka, get(b"http://app.example.com"), "RFC9112 3.2.2 (path '/')",
           forwarded(Want("GET", "/")), forwarded(Want("GET", "http://app.example.com")),
           REJECT),
        _p("abs-consistent", ka, get(b"http://app.example.com/x"),
           "RFC9112 3.2.2 (a server must accept absolute-form)", TO_APP,
           forwarded(Want("GET", "http://app.example.com/x", host="app.example.com")), REJECT),
        _p("no-leading-slash-admin", ka, get(b"admin/x"), "RFC9112 3.2; Issue13", REJECT,
           DENIED, routes=True),
    ]


# ---- path normalisation and deny bypass -----------------------------------------------------

def _paths() -> list[Probe]:
    k, ref = Kind.PATH, "RFC3986 5.2.4; Tsai2018"
    cases = [
        ("path-admin", b"/admin/x", "RFC9110 (the deny rule itself)"),
        ("path-admin-exact", b"/admin", "the deny rule itself"),
        ("path-dotdot", b"/p-dots/../admin/x", ref + "; Issue13"),
        ("path-dot", b"/./admin/x", ref),
        ("path-dotdot-above-root", b"/../admin/x", ref),
        ("path-dotdot-twice", b"/a/b/../../admin/x", ref),
        ("path-double-slash", b"//admin/x", ref + " (merged by many backends)"),
        ("path-encoded-letter", b"/%61dmin/x", "RFC3986 6.2.2.2 (unreserved decoded)"),
        ("path-encoded-dots", b"/p/%2e%2e/admin/x", ref),
        ("path-encoded-dots-upper", b"/p/%2E%2E/admin/x", ref),
        ("path-mixed-dots", b"/p/.%2e/admin/x", ref),
        ("path-encoded-slash", b"/p%2f..%2fadmin/x", ref + " (%2F)"),
        ("path-semicolon-dotdot", b"/p/..;/admin/x", "Tsai2018 (Tomcat path parameters)"),
        ("path-admin-semicolon", b"/admin;p=1/x", "Tsai2018"),
        ("path-trailing-dotdot-back", b"/admin/../admin/x", ref),
        ("path-query-dotdot", b"/p?/../admin/x", "RFC3986 3.4 (query is not path)"),
    ]
    out = [_p(name, k, get(target), why, KEPT_OUT, routes=True) for name, target, why in cases]
    out += [
        _p("path-admin-head", k, get(b"/admin/x", method=b"HEAD"), "the deny rule", DENIED,
           routes=True),
        _p("path-admin-options", k, get(b"/admin/x", method=b"OPTIONS"), "the deny rule",
           DENIED, routes=True),
        _p("path-admin-pipelined", k, GET_X + get(b"/admin/x"),
           "RFC9112 9.3.2 (pipelining); each request routed", KEPT_OUT, routes=True),
    ]
    return out


# ---- h2c, websocket, Expect ---------------------------------------------------------------

H2C = (b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
       b"Connection: Upgrade, HTTP2-Settings\r\n")
WS = (b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
NO_UPGRADE = ("upgrade",)  # HTTP2-Settings without Upgrade is inert


def _upgrades() -> list[Probe]:
    k, ref = Kind.H2C, "BishopFox2020; RFC9113 3.1 (h2c removed); Issue13"
    out = []
    for label, fields in (("full", H2C),
                          ("no-settings", b"Upgrade: h2c\r\nConnection: Upgrade\r\n"),
                          ("no-connection", b"Upgrade: h2c\r\n"),
                          ("uppercase", b"Upgrade: H2C\r\nConnection: upgrade\r\n"),
                          ("listed", b"Upgrade: foo, h2c\r\nConnection: Upgrade\r\n")):
        first = get(b"/x", H + fields)
        out.append(_p(f"h2c-{label}-then-admin", k, (first, get(b"/admin/x")), ref,
                      forwarded(Want("GET", "/x", absent=NO_UPGRADE)), REJECT, routes=True,
                      pause=0.3))
        out.append(_p(f"h2c-{label}-then-request", k, (first, get(b"/second")), ref,
                      forwarded(Want("GET", "/x", absent=NO_UPGRADE), Want("GET", "/second")),
                      REJECT, pause=0.3))
    out += [
        _p("websocket-refused-then-admin", Kind.UPGRADE,
           (get(b"/ws-no", H + WS), get(b"/admin/x")), "Egorov2019 (websocket smuggling)",
           forwarded(Want("GET", "/ws-no")), routes=True, pause=0.3),
        _p("websocket-refused-then-request", Kind.UPGRADE,
           (get(b"/ws-no", H + WS), get(b"/second")), "Egorov2019",
           forwarded(Want("GET", "/ws-no"), Want("GET", "/second")), pause=0.3),
        _p("websocket-accepted", Kind.UPGRADE, get(b"/ws", H + WS), "RFC6455 4",
           answered(101), forwarded(Want("GET", "/ws")), allow_101=True),
    ]
    return out


def _expect() -> list[Probe]:
    k, ref = Kind.EXPECT, "RFC9110 10.1.1; Kettle2022 (early answers); Issue13"
    expect = b"Expect: 100-continue\r\nContent-Length: 5\r\n"
    return [
        _p("expect-early-answer-bleed", k, (post(expect, b"", b"/early"), b"hello"), ref,
           ANY, pause=0.5, victim=VICTIM),
        _p("expect-early-answer-no-body", k, post(expect, b"", b"/early"), ref, ANY,
           victim=VICTIM, timeout=2.0),
        _p("expect-early-413-bleed", k, (post(expect, b"", b"/early413"), b"hello"), ref,
           ANY, pause=0.5, victim=VICTIM),
        _p("early-answer-during-upload", k,
           (post(b"Content-Length: 20\r\n", b"0123456789", b"/early"), b"GET /x HTTP/1."),
           "Kettle2022 (early answers); Issue13", ANY, pause=0.5, victim=VICTIM),
        _p("early-answer-chunked", k,
           (post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n", b"/early"),
            b"0\r\n\r\n"), "Kettle2022", ANY, pause=0.5, victim=VICTIM),
        _p("expect-100-normal", k, (post(expect, b""), b"hello"), "RFC9110 10.1.1",
           POST_HELLO, answered(417), pause=0.3),
        _p("expect-unknown", k, post(b"Expect: teapot\r\nContent-Length: 5\r\n", b"hello"),
           "RFC9110 10.1.1 (417 MAY)", POST_HELLO, answered(417)),
    ]


# ---- header syntax, pipelining ---------------------------------------------------------------

def _headers() -> list[Probe]:
    k, ref = Kind.HEADER, "RFC9112 5"
    cl5 = b"Content-Length: 5\r\n"
    return [
        _p("hdr-space-before-colon-cl", k, post(b"Content-Length : 5\r\n", b"hello"),
           ref + ".1 (MUST 400)", REJECT),
        _p("hdr-obs-fold", k, post(cl5 + b"X-Fold: a\r\n b\r\n", b"hello"), ref + ".2",
           REJECT, POST_HELLO),
        _p("hdr-bare-cr", k, post(cl5 + b"X-Bad: a\rb\r\n", b"hello"), "RFC9112 2.2", REJECT),
        _p("hdr-bare-lf", k, post(cl5 + b"X-Bad: a\nb\r\n", b"hello"), "RFC9112 2.2", REJECT,
           POST_HELLO),
        _p("hdr-nul-in-value", k, post(cl5 + b"X-Bad: a\x00b\r\n", b"hello"), "RFC9110 5.5",
           REJECT),
        _p("hdr-no-colon", k, post(cl5 + b"X-Bad\r\n", b"hello"), ref, REJECT, POST_HELLO),
        _p("hdr-empty-name", k, post(cl5 + b": x\r\n", b"hello"), ref, REJECT),
        _p("hdr-non-ascii-name", k, post(cl5 + b"X-\xc3\xa9: x\r\n", b"hello"), "RFC9110 5.1",
           REJECT, POST_HELLO),
        _p("hdr-leading-space-first", k, b"POST /x HTTP/1.1\r\n Content-Length: 5\r\n" + H +
           b"\r\nhello", "RFC9112 2.2 (whitespace before the first field)", REJECT),
        _p("hdr-cl-with-cr-prefix", k, post(b"Content-Length:\r5\r\n", b"hello"),
           "RFC9112 2.2", REJECT),
    ]


def _pipelines() -> list[Probe]:
    k = Kind.PIPELINE
    return [
        _p("pipeline-two-gets", k, GET_X + get(b"/y"), "RFC9112 9.3.2",
           forwarded(Want("GET", "/x"), Want("GET", "/y"))),
        _p("pipeline-head-then-get", k, get(b"/x", method=b"HEAD") + get(b"/y"),
           "RFC9110 9.3.2 (HEAD has no body); Kettle2022",
           forwarded(Want("HEAD", "/x"), Want("GET", "/y"))),
        _p("pipeline-post-then-get", k, post(b"Content-Length: 5\r\n", b"hello") + get(b"/y"),
           "RFC9112 9.3.2", forwarded(HELLO, Want("GET", "/y"))),
        _p("pipeline-http10-then-get", k, get(b"/x", version=b"1.0") + get(b"/y"),
           "RFC9112 9.3 (1.0 closes)", forwarded(Want("GET", "/x")),
           forwarded(Want("GET", "/x"), Want("GET", "/y"))),
        _p("pipeline-close-then-get", k, get(b"/x", H + b"Connection: close\r\n") + get(b"/y"),
           "RFC9112 9.6", forwarded(Want("GET", "/x"))),
    ]


# ---- ReDoS and size limits (ReDoS last: a frozen front end must not poison other probes) ----

def _limits() -> list[Probe]:
    k = Kind.LIMITS
    return [
        _p("limit-huge-field", k, get(b"/x", H + b"X-Big: " + b"a" * 70000 + b"\r\n"),
           "RFC9112 5 (431)", rejected(400, 413, 431, 494)),
        _p("limit-many-fields", k, get(b"/x", H + b"".join(b"X-F%d: v\r\n" % i
                                                           for i in range(300))),
           "RFC6585 5", rejected(400, 431), forwarded(Want("GET", "/x"))),
        _p("limit-long-target", k, get(b"/" + b"a" * 70000), "RFC9112 3 (414)",
           rejected(400, 414, 431)),
        _p("limit-many-chunks", k, post(b"Transfer-Encoding: chunked\r\n",
                                        b"1\r\nh\r\n" * 2000 + b"0\r\n\r\n"),
           "RFC9112 7.1", forwarded(Want("POST", "/x", b"h" * 2000)), REJECT),
    ]


def _redos() -> list[Probe]:
    k, ref = Kind.REDOS, "Issue13; STYLE (linear-time parsing)"
    blank4 = (b"X-Blank:" + b" " * 64 + b"\r\n") * 4
    return [
        _p("redos-blank-fields-then-bad-line", k, b"GET / HTTP/1.1\r\n" + H + blank4 +
           b"bad line\r\n\r\n", ref, REJECT, timeout=10.0),
        _p("redos-blank-fields-tabs", k, b"GET / HTTP/1.1\r\n" + H +
           (b"X-Blank:" + b"\t" * 64 + b"\r\n") * 4 + b"bad line\r\n\r\n", ref, REJECT,
           timeout=10.0),
        _p("redos-blank-values-then-nul", k, b"GET / HTTP/1.1\r\n" + H +
           (b"X-Blank: a" + b" " * 64 + b"\r\n") * 4 + b"X-Bad: \x00\r\n\r\n", ref, REJECT,
           timeout=10.0),
        _p("redos-response-head", k, get(b"/redos-response"), ref + " (backend's head)",
           answered(502), timeout=10.0),
    ]


def catalogue() -> list[Probe]:
    """Every probe, ReDoS last; names are unique."""
    probes = (_framing() + _smuggling() + _chunks() + _versions() + _hosts() + _paths()
              + _upgrades() + _expect() + _headers() + _pipelines() + _limits() + _redos())
    names = [p.name for p in probes]
    assert len(names) == len(set(names)), "duplicate probe names"
    return probes


PROBES = catalogue()
