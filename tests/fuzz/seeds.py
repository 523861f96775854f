"""Seed inputs for the atheris targets: well-formed messages of every kind, from the same
values the unit and hypothesis tests use. ``python -m tests.fuzz.seeds`` writes them into
``tests/fuzz/corpus/TARGET/seed-N``; ``make fuzz`` then minimises seeds and finds together
(``python -m tests.fuzz.run --merge``)."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import struct

from tests.fuzz.run import CORPUS, ROOT


def _dns() -> list[bytes]:
    from dnslib import EDNS0, QTYPE, DNSRecord
    names = ["web.testns.svc.cluster.local", "db-0.db.testns.svc.cluster.local",
             "_http._tcp.web.testns.svc.cluster.local", "10.0.96.10.in-addr.arpa",
             "db.testns.svc.cluster.local", "web.testns", "example.com", "cluster.local"]
    out = []
    for i, name in enumerate(names):
        for qtype in ("A", "AAAA", "SRV", "PTR", "ANY", "TXT"):
            q = DNSRecord.question(name, qtype)
            q.header.id = 0x5400 + i
            if i % 2:
                q.add_ar(EDNS0(udp_len=1232))
            out.append(q.pack())
    r = DNSRecord.question(names[0], "A").reply()
    r.add_answer(*DNSRecord.parse(r.pack()).rr)
    out.append(r.pack())
    del QTYPE
    return out


def _frames() -> tuple[list[bytes], list[bytes]]:
    from edgemesh.tunnel import frames as fr
    target = fr.Target(fr.Proto(6), "10.0.0.1", 80).encode()
    seq = [fr.Frame(fr.FrameType.OPEN, 2, target), fr.Frame(fr.FrameType.ACCEPT, 1),
           fr.Frame(fr.FrameType.DATA, 2, b"hello", 1), fr.Frame(fr.FrameType.WINDOW, 2,
                                                                  struct.pack(">I", 4096)),
           fr.Frame(fr.FrameType.PING, 0, b"12345678"),
           fr.Frame(fr.FrameType.RESET, 2, fr.reset_payload(1, "no")),
           fr.Frame(fr.FrameType.GOAWAY, 0, fr.reset_payload(0, "bye")),
           fr.Frame(fr.FrameType.CONTROL, 0, b'{"op":"lookup","id":1,"node":"a"}')]
    singles = [fr.encode_frame(f) for f in seq]
    chained = b"".join(struct.pack(">H", len(s)) + s for s in singles)
    return singles, [b"\x00" + chained, b"\x01" + chained]


def _control() -> list[bytes]:
    from edgemesh.tunnel import control as c
    key = "ab" * 32
    msgs = [c.Register(("10.0.0.1:1", "[::1]:2"), 10004, "cone", True),
            c.Registered("1.2.3.4:5"), c.Lookup(7, "edge-1"),
            c.Record(7, True, "edge-1", True, key, ("10.0.0.1:10004",), 10004, "1.2.3.4:5",
                     "cone"),
            c.Record(8, False, "edge-2", False), c.Rendezvous(9, "edge-1"),
            c.Punch(True, "edge-1", 9, key, "1.2.3.4:5", ("10.0.0.1:1",), 10004, "cone", 0.25),
            c.Punch(False, "edge-1", 9, reason="offline"), c.Incoming("c1", "edge-2"),
            c.Circuit(True), c.Circuit(False, "full"), c.Error(3, "bad")]
    return [c.encode(m) for m in msgs]


def _watch() -> list[bytes]:
    svc = {"kind": "Service", "apiVersion": "v1",
           "metadata": {"name": "web", "namespace": "testns", "resourceVersion": "12"},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}
    lines = [{"type": "ADDED", "object": svc}, {"type": "MODIFIED", "object": svc},
             {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "13"}}},
             {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "gone"}},
             {"type": "DELETED", "object": svc}]
    stream = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    page = json.dumps({"kind": "ServiceList", "metadata": {"resourceVersion": "12",
                                                           "continue": "abc"},
                       "items": [svc]}).encode()
    return [b"\x00" + stream, b"\x03" + stream, b"\x00" + page]


def _manifests() -> list[bytes]:
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "examples", "*", "*.yaml"))):
        data = open(path, "rb").read()
        if len(data) <= 4096:
            out.append(data)
    out.append(json.dumps({"kind": "ServiceList", "apiVersion": "v1", "items": [
        {"metadata": {"name": "a", "namespace": "n"},
         "spec": {"clusterIP": "10.96.0.3", "ports": [{"port": 1}]}}]}).encode())
    return out


def _configs() -> list[bytes]:
    from edgemesh import config
    out = [config.render_default().encode()]
    cm = os.path.join(ROOT, "build", "agent", "configmap.yaml")
    if os.path.exists(cm):
        out.append(open(cm, "rb").read())
    out.append(b"modules:\n  edgeDNS: {enable: true, listenInterface: lo}\n"
               b"  edgeProxy: {enable: true, loadBalancer: {consistentHash: {}}}\n"
               b"kubeAPIConfig: {master: 'http://127.0.0.1:10550', qps: 5}\n")
    return [x for x in out if len(x) <= 4096]


def all_seeds() -> dict[str, list[bytes]]:
    from tests.fuzz.test_http_fuzz import CHUNK_SEEDS, SEEDS
    dns = _dns()
    singles, chained = _frames()
    from edgemesh.tunnel.handshake import Hello
    from edgemesh.tunnel.records import frame_record
    hellos = [Hello("edge-1").encode(), Hello("srv", role="server", intent="circuit").encode()]
    return {
        "dns_parser": dns,
        "dns_answer": dns + [b"T" + q[1:] for q in dns[:6]],
        "tunnel_frames": singles + chained,
        "tunnel_records": [b"\x00" + b"".join(frame_record(s) for s in singles),
                           b"\x05" + b"".join(frame_record(b"x" * 40) for _ in range(3))],
        "tunnel_handshake": hellos,
        "tunnel_control": _control(),
        "http_request_head": [s for s in SEEDS if not s.startswith(b"HTTP/")],
        "http_response_head": [s for s in SEEDS if s.startswith(b"HTTP/")] +
                              [b"H" + s[1:] for s in SEEDS if s.startswith(b"HTTP/")],
        "http_chunked_body": [b"\x00" + s for s in CHUNK_SEEDS] +
                             [b"\x01" + s for s in CHUNK_SEEDS],
        "watch_stream": _watch(),
        "manifests": _manifests(),
        "config": _configs(),
    }


def main() -> None:
    for target, seeds in all_seeds().items():
        d = os.path.join(CORPUS, target)
        os.makedirs(d, exist_ok=True)
        for seed in seeds:
            name = "seed-" + hashlib.sha1(seed).hexdigest()[:16]
            with open(os.path.join(d, name), "wb") as f:
                f.write(seed)


if __name__ == "__main__":
    main()
