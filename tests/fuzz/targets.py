"""Coverage-guided fuzz targets (atheris): one function per parser of untrusted bytes.

Each target takes one input (``bytes``) and asserts the parser's contract: it returns a
result or raises the module's own documented error, never another exception; where the codec
has an encoder, what decodes re-encodes to something that decodes to the same value. Time per
input is bounded by the runner (libFuzzer's ``-timeout``). The targets import nothing of
atheris, so ``tests/fuzz/test_atheris_targets.py`` replays the committed corpus through them in
plain pytest, and ``tests/fuzz/run.py`` drives them under atheris (``make fuzz``).
"""
from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable

from edgemesh.errors import ConfigError, RemoteProtocolError


def _pieces(data: bytes) -> tuple[list[int], bytes]:
    """The first byte picks how ``rest`` is cut into pieces: (sizes, rest)."""
    if not data:
        return [], b""
    seed, rest = data[0], data[1:]
    sizes = [1 + (seed * (i + 7)) % 37 for i in range(8)] if seed & 1 else []
    return sizes, rest


def _split(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos = [], 0
    for size in sizes:
        out.append(data[pos:pos + size])
        pos += size
    out.append(data[pos:])
    return out


# ---- DNS -----------------------------------------------------------------------------------

_DNS: dict[str, object] = {}


def _answerer():  # type: ignore[no-untyped-def]
    if "answerer" not in _DNS:
        from edgemesh.dns import records
        from edgemesh.dns.answers import Answerer
        from edgemesh.dns.cache import AnswerCache
        from tests.unit.test_dns_zone import store_from_yaml
        store = store_from_yaml()
        _DNS["answerer"] = Answerer(lambda: records.zone_data_from(store, "cluster.local", 30, 1),
                                    AnswerCache(50), exact_size=50)
    return _DNS["answerer"]


def dns_parser(data: bytes) -> None:
    """The query parser and the response walker: a value, FormatError or Drop."""
    from edgemesh.dns import wire
    try:
        q = wire.parse_query(data)
    except (wire.FormatError, wire.Drop):
        q = None
    if q is not None:
        assert 512 <= wire.udp_limit(q) <= 65535
    try:
        list(wire.records(data))
    except wire.FormatError:
        pass


def dns_answer(data: bytes) -> None:
    """The agent's answer path on a store with a few Services: an answer, a forward or
    nothing, never an exception; answers carry the ID and QR, fit the UDP limit, and parse."""
    from edgemesh.dns import wire
    from edgemesh.dns.answers import Forward
    answerer = _answerer()
    udp = not (data[:1] == b"T")
    try:
        q: wire.Query | None = wire.parse_query(data)
    except (wire.FormatError, wire.Drop):
        q = None
    out = answerer.answer(data, udp=udp)
    if isinstance(out, Forward):
        out = answerer.forwarded(out, None)
    if out is None:
        return
    assert out[:2] == data[:2] and out[2] & 0x80, "answers carry the ID and QR"
    list(wire.records(out))
    if udp:  # the fast path serves repeated UDP questions only (a TCP answer is not limited)
        assert len(out) <= (wire.udp_limit(q) if q is not None else 512)
        assert answerer.cached(data) in (None, out)


# ---- tunnel --------------------------------------------------------------------------------

def tunnel_frames(data: bytes) -> None:
    """decode_frame round-trips; a Mux fed the frames of ``data`` (2-byte length prefixed)
    raises only RemoteProtocolError and keeps its bounds."""
    from edgemesh.tunnel import frames as fr
    try:
        frame = fr.decode_frame(data)
    except RemoteProtocolError:
        pass
    else:
        assert fr.decode_frame(fr.encode_frame(frame)) == frame
    mux = fr.Mux(bool(data[:1] and data[0] & 1), 65536, 65536, max_inbound=4)
    pos = 1
    while pos + 2 <= len(data):
        (n,) = struct.unpack_from(">H", data, pos)
        body = data[pos + 2:pos + 2 + n % 512]
        pos += 2 + n % 512
        try:
            mux.receive(fr.decode_frame(body))
        except RemoteProtocolError:
            return  # the session is closed here
        assert mux.inbound <= 4
        assert all(s.recv_window >= 0 for s in mux.streams.values())


def tunnel_records(data: bytes) -> None:
    """The record reader reassembles whatever the split, up to its documented error; a
    record body that is not ours fails authentication with RemoteProtocolError."""
    from edgemesh.tunnel.handshake import CipherState
    from edgemesh.tunnel.records import RecordReader, SecureChannel, frame_record
    sizes, rest = _pieces(data)
    reader = RecordReader(capacity=4096)
    got: list[bytes] = []
    try:
        for piece in _split(rest, sizes):
            reader.feed(piece)
            while (rec := reader.next_record()) is not None:
                got.append(rec)
    except RemoteProtocolError:
        return
    again = RecordReader(capacity=4096)
    again.feed(b"".join(frame_record(r) for r in got))
    assert [again.next_record() for _ in got] == got
    channel = SecureChannel(CipherState(b"s" * 32), CipherState(b"r" * 32))
    for rec in got[:4]:
        try:
            channel.open(rec)
        except RemoteProtocolError:
            continue
        raise AssertionError("a forged record decrypted")


_KEYS: dict[str, object] = {}


def tunnel_handshake(data: bytes) -> None:
    """Hello.decode round-trips; garbage as message one or two is refused with
    RemoteProtocolError (it cannot pass the PSK-keyed AEAD)."""
    from edgemesh.tunnel.handshake import Handshake, Hello
    try:
        hello = Hello.decode(data)
    except RemoteProtocolError:
        pass
    else:
        assert Hello.decode(hello.encode()) == hello
    if not _KEYS:
        from edgemesh.tunnel.x25519 import StaticKey
        _KEYS["r"], _KEYS["i"] = StaticKey.generate(), StaticKey.generate()
    psk = b"k" * 32
    for initiator in (False, True):
        hs = Handshake(initiator, _KEYS["i" if initiator else "r"], psk, Hello("n"))
        if initiator:
            hs.write_message()
        try:
            hs.read_message(data)
        except RemoteProtocolError:
            continue
        raise AssertionError("a forged handshake message was accepted")


def tunnel_control(data: bytes) -> None:
    """control.decode: a typed message or RemoteProtocolError; encode round-trips."""
    from edgemesh.tunnel import control
    try:
        message = control.decode(data)
    except RemoteProtocolError:
        return
    assert control.decode(control.encode(message)) == message


# ---- HTTP ----------------------------------------------------------------------------------

def _limits():  # type: ignore[no-untyped-def]
    from edgemesh.proxy.http_head import HeadLimits
    return HeadLimits(max_size=2048, max_fields=20)


def http_request_head(data: bytes) -> None:
    """head_end + parse_request_head: a head or HeadError with a documented status and cause."""
    from edgemesh.proxy.http_head import CAUSES, HeadError, head_end, parse_request_head
    limits = _limits()
    try:
        end = head_end(data, limits, request=True)
        if end > 0:
            head = parse_request_head(data[:end], limits)
            assert head.length >= 0 and len(head.headers) <= limits.max_fields
            assert head.version in (b"1.0", b"1.1") and b"#" not in head.target
    except HeadError as e:
        assert e.status in (400, 405, 431, 501, 502, 505) and e.cause in CAUSES


def http_response_head(data: bytes) -> None:
    """parse_response_head and its fast path parse_response_framing agree, or both refuse."""
    from edgemesh.proxy.http_head import (
        CAUSES,
        HeadError,
        head_end,
        parse_response_framing,
        parse_response_head,
    )
    limits = _limits()
    method = b"HEAD" if data[:1] == b"H" else b"GET"

    def reading(parse):  # type: ignore[no-untyped-def]
        try:
            end = head_end(data, limits, request=False)
            if end < 0:
                return None
            h = parse(data[:end], method, limits)
        except HeadError as e:
            assert e.cause in CAUSES
            return e.status, e.cause
        return h.status, h.framing, h.length, h.keep_alive
    assert reading(parse_response_framing) == reading(parse_response_head)


def http_chunked_body(data: bytes) -> None:
    """A chunked BodyTracker fed ``data`` in pieces never consumes more than it is given
    and raises only HeadError."""
    from edgemesh.proxy.http_body import BodyTracker
    from edgemesh.proxy.http_head import CAUSES, Framing, HeadError
    sizes, rest = _pieces(data)
    tracker = BodyTracker(Framing.CHUNKED)
    buf = b""
    try:
        for piece in _split(rest, sizes):
            buf += piece
            n = tracker.feed(buf)
            assert 0 <= n <= len(buf)
            buf = buf[n:]
            if tracker.done:
                return
        tracker.eof()
    except HeadError as e:
        assert e.cause in CAUSES


# ---- metadata ------------------------------------------------------------------------------

def watch_stream(data: bytes) -> None:
    """LineSplitter + decode_event (and list_page, status_error, object_key on what decodes):
    RemoteProtocolError only, lines the same whatever the chunking."""
    from edgemesh.meta import kubewire
    sizes, rest = _pieces(data)
    splitter = kubewire.LineSplitter(limit=1024)
    lines: list[bytes] = []
    try:
        for piece in _split(rest, sizes):
            lines += splitter.feed(piece)
    except RemoteProtocolError:
        return
    whole = kubewire.LineSplitter(limit=1 << 20).feed(rest)
    assert lines == whole[:len(lines)]
    for line in lines:
        try:
            event = kubewire.decode_event(line)
        except RemoteProtocolError:
            continue
        assert isinstance(event.resource_version, str)
        kubewire.object_key(event.object, True)
        if event.type == "ERROR":
            kubewire.status_error(event.object)
    try:
        page = kubewire.list_page(rest)
    except RemoteProtocolError:
        return
    assert isinstance(page.items, list)


def manifests(data: bytes) -> None:
    """The files source's parser (YAML or JSON by the first byte): objects and problems,
    never an exception."""
    from edgemesh.meta.files import read_manifest
    path = "fuzz.json" if data[:1] == b"{" else "fuzz.yaml"
    text = data.decode("utf-8", "replace")
    parsed, problems = read_manifest(path, text)
    assert all(isinstance(p, str) for p in problems)
    for item in parsed:
        assert item.kind and item.obj is not None


_CONFIG_DIR: list[str] = []


def config(data: bytes) -> None:
    """config.load on a file holding ``data``: a Config or ConfigError, never another error."""
    from edgemesh import config as cfg
    if not _CONFIG_DIR:
        _CONFIG_DIR.append(tempfile.mkdtemp(prefix="fuzz-config-"))
    path = os.path.join(_CONFIG_DIR[0], "config.yaml")
    with open(path, "wb") as f:
        f.write(data)
    try:
        cfg.load(path, [])
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) for p in e.problems)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "dns_parser": dns_parser,
    "dns_answer": dns_answer,
    "tunnel_frames": tunnel_frames,
    "tunnel_records": tunnel_records,
    "tunnel_handshake": tunnel_handshake,
    "tunnel_control": tunnel_control,
    "http_request_head": http_request_head,
    "http_response_head": http_response_head,
    "http_chunked_body": http_chunked_body,
    "watch_stream": watch_stream,
    "manifests": manifests,
    "config": config,
}
