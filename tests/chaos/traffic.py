"""Real clients on one node, running the whole time the faults are injected.

Each flow is a thread that writes one JSON line per attempt to the output file:
``{"t": monotonic seconds, "flow": name, "ok": bool, "err": "...", "lost": bool}``.
``lost`` marks a long-lived connection (TCP stream, WebSocket) that broke; the flow then opens
a new one. Request flows spawn a real client per request (curl, dig).

    python -m tests.chaos.traffic OUT.jsonl
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

PERIOD = 0.25  # seconds between attempts of one flow
HTTP = {"http-relayed": ("10.96.3.1", "hello from b"), "http-lan": ("10.96.3.6", "hello from a2"),
        "http-cloud": ("10.96.3.5", "hello from c1")}
STREAMS = {"stream-relayed": "10.96.3.2", "stream-lan": "10.96.3.7"}
UDP = ("10.96.3.3", 7)
WS = "ws://10.96.3.4/"
DNS_NAME, DNS_ANSWER = "web-b.default.svc.cluster.local", "10.96.3.1"

_lock = threading.Lock()
_out = None


def record(flow: str, ok: bool, err: str = "", lost: bool = False) -> None:
    line = json.dumps({"t": time.monotonic(), "flow": flow, "ok": ok, "err": err[:200],
                       "lost": lost})
    with _lock:
        assert _out is not None
        _out.write(line + "\n")
        _out.flush()


def loop(flow: str, attempt: Callable[[], str]) -> None:
    """Run ``attempt`` every PERIOD; it returns "" on success, else what went wrong."""
    while True:
        start = time.monotonic()
        try:
            err = attempt()
        except Exception as e:  # a client's failure is a data point, not the end
            err = f"{type(e).__name__}: {e}"
        record(flow, not err, err)
        time.sleep(max(0.0, PERIOD - (time.monotonic() - start)))


def curl(ip: str, want: str) -> Callable[[], str]:
    def attempt() -> str:
        r = subprocess.run(["curl", "-sS", "--max-time", "5", f"http://{ip}/"],
                           capture_output=True, text=True, timeout=10)
        return "" if r.stdout.startswith(want) else (r.stderr.strip() or r.stdout[:80])
    return attempt


def dig() -> str:
    r = subprocess.run(["dig", "+short", "+time=2", "+tries=1", "-p", "1053", "@127.0.0.1",
                        DNS_NAME], capture_output=True, text=True, timeout=10)
    return "" if r.stdout.strip() == DNS_ANSWER else (r.stdout.strip() or "no answer")[:80]


def udp() -> None:
    """One UDP socket for the flow's life, as a client keeping a session; a new one (a lost
    session) only after 8 unanswered datagrams in a row."""
    while True:
        misses, n = 0, 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.connect(UDP)
            while misses < 8:
                start = time.monotonic()
                msg = b"u%d" % n
                try:
                    s.send(msg)
                    while (got := s.recv(65535)) != b"echo " + msg:
                        if not got.startswith(b"echo u"):
                            raise ConnectionError(f"wrong answer {got[:40]!r}")
                    record("udp", True)
                    misses, n = 0, n + 1
                except OSError as e:
                    misses += 1
                    record("udp", False, f"{type(e).__name__}: {e}", lost=misses == 8 and n > 0)
                time.sleep(max(0.0, PERIOD - (time.monotonic() - start)))


def stream(flow: str, ip: str) -> None:
    """One TCP connection kept open; a line echoed every PERIOD (socat cat at the far end)."""
    while True:
        try:
            sock = socket.create_connection((ip, 80), timeout=5)
        except OSError as e:
            record(flow, False, f"connect: {e}")
            time.sleep(PERIOD)
            continue
        n = 0
        try:
            with sock:
                sock.settimeout(10)
                while True:
                    msg = b"tick %d %s\n" % (n, b"x" * 1000)
                    sock.sendall(msg)
                    got = b""
                    while len(got) < len(msg):
                        chunk = sock.recv(65536)
                        if not chunk:
                            raise ConnectionError("closed by the far end")
                        got += chunk
                    if got != msg:
                        raise ConnectionError("echo corrupted")
                    record(flow, True)
                    n += 1
                    time.sleep(PERIOD)
        except OSError as e:
            record(flow, False, f"{type(e).__name__}: {e}", lost=n > 0)
            time.sleep(PERIOD)


def websocket() -> None:
    from websockets.sync.client import connect
    while True:
        n = 0
        try:
            with connect(WS, open_timeout=5, close_timeout=1) as ws:
                while True:
                    ws.send(f"m{n}")
                    if ws.recv(timeout=10) != f"ws m{n}":
                        raise ConnectionError("wrong echo")
                    record("websocket", True)
                    n += 1
                    time.sleep(PERIOD)
        except Exception as e:  # websockets raises its own kinds on a broken session
            record("websocket", False, f"{type(e).__name__}: {e}", lost=n > 0)
            time.sleep(PERIOD)


def main(path: str) -> None:
    global _out
    _out = open(path, "a", buffering=1)  # noqa: SIM115 - held for the process's life
    threads = [threading.Thread(target=loop, args=(f, curl(*HTTP[f])), daemon=True)
               for f in HTTP]
    threads += [threading.Thread(target=loop, args=("dns", dig), daemon=True),
                threading.Thread(target=udp, daemon=True),
                threading.Thread(target=websocket, daemon=True)]
    threads += [threading.Thread(target=stream, args=(f, ip), daemon=True)
                for f, ip in STREAMS.items()]
    for t in threads:
        t.start()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1])
