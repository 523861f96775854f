"""Send an HTTP probe (``tests/http_probes.py``) to a front end, watch what its client, another
client and the recording backend behind it see, and judge SAFE or UNSAFE with a one-line reason.

One probe at a time: the backend forgets everything and closes its connections first (so the
front end's pool starts empty and everything recorded afterwards belongs to this probe), the
probe's writes go out on one connection, a normal request on another connection checks the
front end is still serving meanwhile, then the victims (if any: three clients at once sending
a plain request, which each must get answered on its own), then the verdict.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from tests.http_probes import Outcome, Probe, Want
from tests.recording_backend import RecordingBackend, Seen

LIVE_TIMEOUT = 2.0  # another client's request must be answered within this while a probe runs
IDLE = 0.4  # a response stream counts as finished after this long without bytes
DENIED_PREFIX = b"/admin"
VICTIMS = 3  # victim clients at once after a probe that has one
LIVE = b"GET /__live HTTP/1.1\r\nHost: app.example.com\r\n\r\n"


@dataclass(frozen=True)
class Front:
    """A front end under test: where it listens, whether it has the probe routes, its backend."""
    name: str
    host: str
    port: int
    backend: RecordingBackend
    routes: bool


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = True

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n.lower() == name), None)

    @property
    def seen(self) -> tuple[int, str] | None:
        """(backend request id, target) this response answers, if the backend made it."""
        v = self.header(b"x-seen")
        if v is None or b" " not in v:
            return None
        rid, target = v.split(b" ", 1)
        return (int(rid), target.decode("latin-1")) if rid.isdigit() else None


@dataclass
class Exchange:
    """What a client got on one connection."""
    responses: list[Response] = field(default_factory=list)
    closed: bool = False
    raw: bytes = b""
    garbage: bytes = b""  # bytes that did not parse as a response
    send_error: str = ""

    @property
    def first_status(self) -> int:
        """First final status; 0: closed without one; -1: still open without one."""
        for r in self.responses:
            if r.status >= 200 or r.status == 101:
                return r.status
        return 0 if self.closed else -1


def parse_responses(raw: bytes, closed: bool) -> tuple[list[Response], bytes]:
    """Responses in ``raw`` (leniently: a client's view), and what is left unparsed."""
    out: list[Response] = []
    buf = raw
    while buf:
        end = buf.find(b"\r\n\r\n")
        if end < 0 or not buf.startswith(b"HTTP/"):
            return out, buf
        lines = buf[:end].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            return out, buf
        headers = [tuple(x.strip() for x in line.split(b":", 1)) for line in lines[1:]
                   if b":" in line]
        resp = Response(int(parts[1]), headers)  # type: ignore[arg-type]
        buf = buf[end + 4:]
        length = resp.header(b"content-length")
        if resp.status < 200 or resp.status in (204, 304) or resp.header(b"x-method") == b"HEAD":
            pass
        elif (resp.header(b"transfer-encoding") or b"").lower().endswith(b"chunked"):
            body, buf, resp.complete = _dechunk(buf)
            resp.body = body
        elif length is not None and length.isdigit():
            n = int(length)
            resp.body, resp.complete, buf = buf[:n], len(buf) >= n, buf[n:]
        else:
            resp.body, resp.complete, buf = buf, closed, b""
        out.append(resp)
        if resp.status == 101:
            return out, buf
    return out, b""


def _dechunk(buf: bytes) -> tuple[bytes, bytes, bool]:
    body = b""
    while True:
        end = buf.find(b"\r\n")
        if end < 0:
            return body, b"", False
        try:
            size = int(buf[:end].split(b";")[0], 16)
        except ValueError:
            return body, buf, False
        buf = buf[end + 2:]
        if size == 0:
            end = buf.find(b"\r\n\r\n") if not buf.startswith(b"\r\n") else -2
            return body, buf[end + 4:] if end >= 0 else buf[2:], True
        body, buf = body + buf[:size], buf[size + 2:]


def send_writes(sock: socket.socket, writes: tuple[bytes, ...], pause: float) -> Exchange:
    """Send ``writes`` ``pause`` seconds apart, keeping what arrives in between."""
    ex = Exchange()
    for i, data in enumerate(writes):
        if i:
            ex.raw += _read_for(sock, pause)
        try:
            sock.sendall(data)
        except OSError as e:
            ex.send_error = str(e)
            break
    return ex


def read_answers(sock: socket.socket, ex: Exchange, timeout: float) -> Exchange:
    """Read until the peer closes, ``IDLE`` seconds pass without bytes after a final
    response, or ``timeout``; then parse what came."""
    raw = bytearray(ex.raw)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        responses, _ = parse_responses(bytes(raw), False)
        done = any((r.status >= 200 or r.status == 101) and r.complete for r in responses)
        wait = min(IDLE if done else 0.2, max(deadline - time.monotonic(), 0.01))
        sock.settimeout(wait)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            if done:
                break
            continue
        except OSError:
            data = b""
        if not data:
            ex.closed = True
            break
        raw += data
    ex.raw = bytes(raw)
    ex.responses, ex.garbage = parse_responses(ex.raw, ex.closed)
    return ex


def exchange(sock: socket.socket, writes: tuple[bytes, ...], pause: float,
             timeout: float) -> Exchange:
    """``send_writes`` then ``read_answers``."""
    return read_answers(sock, send_writes(sock, writes, pause), timeout)


def _read_for(sock: socket.socket, seconds: float) -> bytes:
    """Whatever arrives within ``seconds`` (the probe pauses between writes while reading)."""
    got = bytearray()
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except (TimeoutError, OSError):
            break
        if not data:
            break
        got += data
    return bytes(got)


def _victims(front: Front, request: bytes) -> list[Exchange]:
    """``VICTIMS`` clients sending ``request`` at once, so that every upstream connection the
    front end pooled gets used by one of them."""
    out: list[Exchange] = []

    def one() -> None:
        try:
            with _connect(front) as sock:
                out.append(exchange(sock, (request,), 0, 3.0))
        except OSError:
            out.append(Exchange(closed=True))
    threads = [threading.Thread(target=one, daemon=True) for _ in range(VICTIMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def _connect(front: Front) -> socket.socket:
    return socket.create_connection((front.host, front.port), timeout=5)


@dataclass
class Live:
    """The liveness check: another client's plain request, timed."""
    ok: bool = False
    elapsed: float = 0.0
    detail: str = ""


def check_live(front: Front, limit: float = LIVE_TIMEOUT) -> Live:
    """A plain GET on a fresh connection, answered 200 by the backend within ``limit``."""
    start = time.monotonic()
    try:
        with _connect(front) as sock:
            ex = exchange(sock, (LIVE,), 0, limit)
    except OSError as e:
        return Live(False, time.monotonic() - start, f"connect: {e}")
    elapsed = time.monotonic() - start
    seen = ex.responses[0].seen if ex.responses else None
    ok = bool(ex.responses) and ex.responses[0].status == 200 and seen is not None \
        and seen[1] == "/__live" and elapsed < limit
    return Live(ok, elapsed, f"status {ex.first_status}")


@dataclass
class Verdict:
    probe: str
    front: str
    safe: bool
    reason: str


def run_probe(probe: Probe, front: Front, retry: bool = True) -> Verdict:
    """Run one probe against ``front`` and judge it.

    When the other client waited too long, a control request (probe connection closed) is
    timed: if it is slow too, the machine was busy rather than the front end stuck on the
    probe, and the probe runs once more."""
    verdict, live = _run_once(probe, front)
    if not live.ok and retry:
        control = check_live(front, 10.0)
        if control.ok and control.elapsed > LIVE_TIMEOUT / 4:
            return run_probe(probe, front, retry=False)
    return verdict


def _run_once(probe: Probe, front: Front) -> tuple[Verdict, Live]:
    front.backend.reset()
    time.sleep(0.05)
    live_box: list[Live] = []
    try:
        sock = _connect(front)
    except OSError as e:
        return (Verdict(probe.name, front.name, False, f"front end refused a connection: {e}"),
                Live(True))
    try:
        ex = send_writes(sock, probe.writes, probe.pause)
        # another client's request goes out while the probe's connection is open and served
        thread = threading.Thread(target=lambda: live_box.append(check_live(front)),
                                  daemon=True)
        thread.start()
        ex = read_answers(sock, ex, probe.timeout)
        victims = _victims(front, probe.victim) if probe.victim is not None else None
        thread.join(LIVE_TIMEOUT + 3)
    finally:
        sock.close()
    time.sleep(0.1)
    live = live_box[0] if live_box else Live(False, LIVE_TIMEOUT, "no result")
    return judge(probe, front, ex, victims, live, front.backend.requests(),
                 front.backend.errors()), live


# ---- judging ------------------------------------------------------------------------------

def normalised_path(target: str) -> bytes:
    """The path a lenient backend could serve for ``target``: absolute-form authority dropped,
    a missing leading slash added, query cut, percent-decoded once, ``;params`` dropped,
    slashes merged, dot-segments removed (RFC 3986 5.2.4)."""
    t = target.encode("latin-1")
    if b"://" in t:
        t = b"/" + t.split(b"://", 1)[1].partition(b"/")[2]
    t = t.split(b"?", 1)[0].split(b"#", 1)[0]
    t = unquote_to_bytes(t)
    segments = [s.split(b";", 1)[0] for s in t.split(b"/")]
    out: list[bytes] = []
    for s in segments:
        if s in (b"", b"."):
            continue
        if s == b"..":
            if out:
                out.pop()
            continue
        out.append(s)
    return b"/" + b"/".join(out)


def _matches(want: Want, seen: Seen) -> bool:
    if (seen.method, seen.target, seen.body) != (want.method, want.target, want.body):
        return False
    if want.host is not None and (seen.header("host") or "").lower() != want.host:
        return False
    return not any(seen.header(name) is not None for name in want.absent)


def outcome_holds(outcome: Outcome, ex: Exchange, probe_reqs: list[Seen]) -> bool:
    """Whether ``outcome`` describes what happened."""
    if outcome.statuses and ex.first_status not in outcome.statuses:
        return False
    if outcome.seen is None:
        return True
    complete = [r for r in probe_reqs if r.complete]
    return len(complete) == len(outcome.seen) and all(
        _matches(w, s) for w, s in zip(outcome.seen, complete, strict=True))


def global_problems(probe: Probe, front: Front, ex: Exchange, victims: list[Exchange] | None,
                    live: Live, requests: list[Seen], errors: list[str]) -> list[str]:
    """Failures of the checks every probe gets, most serious first."""
    out = []
    if front.routes:
        for r in requests:
            if normalised_path(r.target).startswith(DENIED_PREFIX):
                out.append(f"denied path reached the backend as {r.method} {r.target!r}")
    if not probe.allow_101 and any(r.status == 101 for r in ex.responses):
        out.append("101 Switching Protocols relayed: the connection became a raw tunnel")
    probe_reqs = [r for r in requests if r.target not in ("/__live", "/victim")]
    relayed = {resp.seen[0] for resp in ex.responses if resp.seen}
    lost = [r for r in probe_reqs if r.answered and r.id not in relayed]
    if lost:
        out.append(f"backend answered {lost[0].method} {lost[0].target!r} but the client "
                   "never got that answer (smuggled or misrouted)")
    if errors:
        out.append(f"backend's strict parser failed: {errors[0][:160]}")
    foreign = [resp.seen[1] for resp in ex.responses if resp.seen and resp.seen[1] in
               ("/__live", "/victim")]
    if foreign:
        out.append(f"the probe's client got another client's response ({foreign[0]})")
    if victims is not None:
        vseen = [r for r in requests if r.target == "/victim"]
        for victim in victims:
            got = victim.responses[0].seen if victim.responses else None
            if not (got and got[1] == "/victim" and victim.responses[0].status == 200):
                out.append(f"victim on another connection got status {victim.first_status} "
                           f"answering {got[1] if got else None!r}; backend saw "
                           f"{[(r.method, r.target, r.body[:20]) for r in vseen]}")
                break
        if len(vseen) != len(victims) or any(not r.complete or r.body for r in vseen):
            out.append(f"backend saw the victims as {[(r.target, r.body[:20]) for r in vseen]}")
    if not live.ok:
        out.append(f"another client waited {live.elapsed:.1f}s ({live.detail})")
    return out


def describe(ex: Exchange, probe_reqs: list[Seen]) -> str:
    """What happened, in a few words."""
    statuses = [r.status for r in ex.responses if r.status >= 200 or r.status == 101]
    sent = [f"{r.method} {r.target[:40]!r}{'' if r.complete else ' (incomplete)'}"
            f"{f' body {r.body[:24]!r}' if r.body else ''}" for r in probe_reqs]
    got = statuses or {0: "no answer", -1: "no answer"}[ex.first_status]
    state = "closed" if ex.closed else "open"
    return f"client got {got} ({state}); backend saw {sent or 'nothing'}"


def judge(probe: Probe, front: Front, ex: Exchange, victims: list[Exchange] | None, live: Live,
          requests: list[Seen], errors: list[str]) -> Verdict:
    """SAFE when every check passes and one of the probe's outcomes holds."""
    problems = global_problems(probe, front, ex, victims, live, requests, errors)
    probe_reqs = [r for r in requests if r.target not in ("/__live", "/victim")]
    if problems:
        return Verdict(probe.name, front.name, False, problems[0])
    for outcome in probe.safe:
        if outcome_holds(outcome, ex, probe_reqs):
            return Verdict(probe.name, front.name, True, outcome.label)
    wanted = " | ".join(o.label for o in probe.safe)
    return Verdict(probe.name, front.name, False,
                   f"{describe(ex, probe_reqs)}; safe would be: {wanted}")


def recover(front: Front, limit: float = 60.0) -> bool:
    """Wait until the front end answers a plain request again (after a probe froze it)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check_live(front, 3.0).ok:
            return True
        time.sleep(0.5)
    return False


def run_all(probes: list[Probe], front: Front) -> list[Verdict]:
    """Every probe that applies to ``front``, in order, recovering after a freeze."""
    out = []
    for probe in probes:
        if probe.routes and not front.routes:
            continue
        verdict = run_probe(probe, front)
        out.append(verdict)
        if not verdict.safe:
            recover(front)
    return out
