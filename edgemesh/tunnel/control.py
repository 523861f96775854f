"""The tunnel's control messages (CONTROL frames, docs/tunnel-protocol.md §6 and §7), typed.

Sans-IO: ``decode(payload)`` turns a peer's JSON into one frozen dataclass per kind, checking
every field it reads (type, range, size) and naming the one that is wrong
(``record.port: expected an integer 0-65535``); anything else about the payload — not JSON,
no ``op``, too deep, too large — is a ``RemoteProtocolError`` too, and a kind this version does
not know is an ``UnknownKind`` (callers answer or ignore it; the session stays up). Fields this
version does not know are ignored, so newer peers may add some. ``encode(message)`` gives the
bytes earlier versions sent: the same keys in the same order, compact JSON (the relay's
``circuit`` answer keeps ``json.dumps``' default separators).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from edgemesh.errors import RemoteProtocolError

MAX_PAYLOAD = 60000  # a CONTROL frame's payload, at most (Session.send_control's bound too)
MAX_NAME = 253  # node names: DNS subdomain names
MAX_TEXT = 1024  # reasons, addresses
MAX_ADDRS = 256  # addresses in a register or record (the relay keeps the first 16)
MAX_ID = 2**53 - 1  # JSON numbers stay exact up to here
MAX_DELAY = 1.0  # punch.MAX_DELAY
HEX = frozenset("0123456789abcdef")


class UnknownKind(RemoteProtocolError):
    """A well-formed message of a kind this version does not know: ``op``, and its ``id``."""

    def __init__(self, op: str, rid: int | None) -> None:
        super().__init__(f"unknown op {op!r}")
        self.op = op
        self.id = rid


@dataclass(frozen=True)
class Register:
    """Agent → server: the addresses and tunnel port peers may try, and its NAT kind."""
    op: ClassVar[str] = "register"
    addrs: tuple[str, ...]
    port: int
    nat: str = "unknown"
    mapped: bool = True  # this session comes from the agent's tunnel port


@dataclass(frozen=True)
class Registered:
    """Server → agent: the address the server sees the agent's session come from."""
    op: ClassVar[str] = "registered"
    observed: str


@dataclass(frozen=True)
class Lookup:
    """Agent → server: what the server knows of ``node`` (answered by a ``Record``)."""
    op: ClassVar[str] = "lookup"
    id: int
    node: str


@dataclass(frozen=True)
class Record:
    """Server → agent: the answer to ``Lookup`` ``id``; the rest is empty when not found."""
    op: ClassVar[str] = "record"
    id: int | None
    found: bool
    node: str
    online: bool
    key: str = ""
    addrs: tuple[str, ...] = ()
    port: int = 0
    public: str = ""
    nat: str = ""


@dataclass(frozen=True)
class Rendezvous:
    """Agent → server: coordinate a hole punch with ``node`` (answered by ``Punch``es)."""
    op: ClassVar[str] = "rendezvous"
    id: int
    node: str


@dataclass(frozen=True)
class Punch:
    """Server → agent: connect to ``node`` now (``ok``; ``id`` only in the asker's copy), or
    the reason the server will not coordinate (``ok`` false)."""
    op: ClassVar[str] = "punch"
    ok: bool
    node: str
    id: int | None = None
    key: str = ""
    public: str = ""
    addrs: tuple[str, ...] = ()
    port: int = 0
    nat: str = ""
    delay: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class Incoming:
    """Server → agent: open an accepting relay circuit with ``circuit`` (its token)."""
    op: ClassVar[str] = "incoming"
    circuit: str
    from_node: str  # "from" on the wire


@dataclass(frozen=True)
class Circuit:
    """Relay → circuit member, once: the circuit is spliced (``ok``) or why not."""
    op: ClassVar[str] = "circuit"
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class Error:
    """The answer to a request that cannot be served (an unknown op, not a relay)."""
    op: ClassVar[str] = "error"
    id: int | None
    reason: str


Message = Register | Registered | Lookup | Record | Rendezvous | Punch | Incoming | Circuit | Error


# ---- encoding ---------------------------------------------------------------------------------

def to_dict(m: Message) -> dict[str, Any]:
    """The JSON object for ``m``, keys in the order earlier versions wrote them."""
    if isinstance(m, Register):
        return {"op": m.op, "addrs": list(m.addrs), "port": m.port, "nat": m.nat,
                "mapped": m.mapped}
    if isinstance(m, Registered):
        return {"op": m.op, "observed": m.observed}
    if isinstance(m, Lookup | Rendezvous):
        return {"op": m.op, "id": m.id, "node": m.node}
    if isinstance(m, Record):
        if not m.found:
            return {"op": m.op, "id": m.id, "found": False, "node": m.node, "online": m.online}
        return {"op": m.op, "id": m.id, "found": True, "node": m.node, "key": m.key,
                "addrs": list(m.addrs), "port": m.port, "public": m.public, "nat": m.nat,
                "online": m.online}
    if isinstance(m, Punch):
        if not m.ok:
            return {"op": m.op, "id": m.id, "node": m.node, "ok": False, "reason": m.reason}
        offer = {"op": m.op, "ok": True, "node": m.node, "key": m.key, "public": m.public,
                 "addrs": list(m.addrs), "port": m.port, "nat": m.nat,
                 "delay": round(m.delay, 4)}
        return offer if m.id is None else {**offer, "id": m.id}
    if isinstance(m, Incoming):
        return {"op": m.op, "circuit": m.circuit, "from": m.from_node}
    if isinstance(m, Circuit):
        return {"op": m.op, "ok": m.ok, "reason": m.reason}
    return {"op": m.op, "id": m.id, "reason": m.reason}


def encode(m: Message) -> bytes:
    """The CONTROL frame payload for ``m``."""
    if isinstance(m, Circuit):
        return json.dumps(to_dict(m)).encode()
    return json.dumps(to_dict(m), separators=(",", ":")).encode()


# ---- decoding ---------------------------------------------------------------------------------

def decode(payload: bytes) -> Message:
    """The message in a CONTROL frame; RemoteProtocolError (UnknownKind for an unknown op)."""
    if len(payload) > MAX_PAYLOAD:
        raise RemoteProtocolError(f"control message of {len(payload)} bytes "
                                  f"(at most {MAX_PAYLOAD})")
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise RemoteProtocolError("control message is not JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("op"), str):
        raise RemoteProtocolError("control message without op")
    op = obj["op"]
    parse = _PARSERS.get(op)
    if parse is None:
        rid = obj.get("id")
        raise UnknownKind(op[:64], rid if _is_id(rid) else None)
    message: Message = parse(_Fields(op, obj))
    return message


class _Fields:
    """Typed reads of one message's fields; each error names ``op.field``."""

    def __init__(self, op: str, obj: dict[str, Any]) -> None:
        self.op = op
        self.obj = obj

    def _bad(self, name: str, expected: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"{self.op}.{name}: expected {expected}")

    def has(self, name: str) -> bool:
        return name in self.obj

    def boolean(self, name: str, default: bool | None = None) -> bool:
        v = self.obj.get(name, default)
        if not isinstance(v, bool):
            raise self._bad(name, "true or false")
        return v

    def integer(self, name: str, low: int, high: int, default: int | None = None) -> int:
        v = self.obj.get(name, default)
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            raise self._bad(name, f"an integer {low}-{high}")
        return v

    def rid(self, name: str = "id", optional: bool = False) -> int | None:
        if optional and self.obj.get(name) is None:
            return None
        return self.integer(name, 0, MAX_ID)

    def text(self, name: str, limit: int = MAX_TEXT, default: str | None = None,
             empty: bool = True) -> str:
        v = self.obj.get(name, default)
        if not isinstance(v, str) or len(v) > limit or (not empty and not v):
            raise self._bad(name, f"a string of {0 if empty else 1}-{limit} characters")
        return v

    def name(self, field: str) -> str:
        return self.text(field, MAX_NAME, empty=False)

    def key(self, field: str) -> str:
        v = self.text(field, 64, default="")
        if v and (len(v) != 64 or not HEX.issuperset(v)):
            raise self._bad(field, "a key of 64 lower-case hex digits")
        return v

    def addrs(self, field: str) -> tuple[str, ...]:
        v = self.obj.get(field, [])
        if (not isinstance(v, list) or len(v) > MAX_ADDRS
                or not all(isinstance(a, str) and 0 < len(a) <= MAX_TEXT for a in v)):
            raise self._bad(field, f"a list of at most {MAX_ADDRS} addresses (strings)")
        return tuple(v)

    def host_port(self, field: str) -> str:
        v = self.text(field)
        host, sep, port = v.rpartition(":")
        if not (sep and host and port.isdigit() and port.isascii() and len(port) <= 5
                and 0 < int(port) < 65536):
            raise self._bad(field, "HOST:PORT with a port 1-65535")
        return v

    def delay(self, field: str) -> float:
        v = self.obj.get(field, 0.0)
        if (not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v)
                or not 0 <= v <= MAX_DELAY):
            raise self._bad(field, f"a number of seconds 0-{MAX_DELAY:g}")
        return float(v)


def _is_id(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_ID


def _register(f: _Fields) -> Register:
    return Register(f.addrs("addrs"), f.integer("port", 0, 65535), f.text("nat", 32, "unknown"),
                    f.boolean("mapped", True))


def _record(f: _Fields) -> Record:
    found = f.boolean("found")
    rid, node, online = f.rid(optional=True), f.name("node"), f.boolean("online", False)
    if not found:
        return Record(rid, False, node, online)
    return Record(rid, True, node, online, f.key("key"), f.addrs("addrs"),
                  f.integer("port", 0, 65535, 0), f.text("public", default=""),
                  f.text("nat", 32, ""))


def _punch(f: _Fields) -> Punch:
    ok, node, rid = f.boolean("ok"), f.name("node"), f.rid(optional=True)
    if not ok:
        return Punch(False, node, rid, reason=f.text("reason", default=""))
    return Punch(True, node, rid, f.key("key"), f.host_port("public"), f.addrs("addrs"),
                 f.integer("port", 0, 65535, 0), f.text("nat", 32, ""), f.delay("delay"))


_PARSERS: dict[str, Any] = {
    "register": _register,
    "registered": lambda f: Registered(f.text("observed")),
    "lookup": lambda f: Lookup(f.integer("id", 0, MAX_ID), f.name("node")),
    "record": _record,
    "rendezvous": lambda f: Rendezvous(f.integer("id", 0, MAX_ID), f.name("node")),
    "punch": _punch,
    "incoming": lambda f: Incoming(f.text("circuit", 64, empty=False), f.name("from")),
    "circuit": lambda f: Circuit(f.boolean("ok"), f.text("reason", default="")),
    "error": lambda f: Error(f.rid(optional=True), f.text("reason", default="")),
}
