"""Interception rules: computed whole from the desired state, applied by difference, removed on
exit.

The proxy owns these chains and nothing else but the jump rules into them:

    nat      PREROUTING -j EDGEMESH-PREROUTING   (clients in other namespaces / pods via us)
             OUTPUT     -j EDGEMESH-OUTPUT       (clients on this node)
             EDGEMESH-PREROUTING: -d 127.0.0.0/8 -j RETURN, then -j EDGEMESH-SERVICES
             EDGEMESH-OUTPUT -j EDGEMESH-SERVICES
             EDGEMESH-SERVICES: one DNAT per TCP (service IP, port) → the transparent TCP
                 listener (or a port's own listener), where a service IP is a ClusterIP, an
                 externalIP or a load-balancer ingress IP; then, when there are NodePorts, a
                 jump for local destinations (``-m addrtype --dst-type LOCAL``, within each
                 ``nodePortAddresses`` range if any) to
             EDGEMESH-NODEPORTS: one DNAT per TCP nodePort.
    mangle   PREROUTING -j EDGEMESH-PREROUTING, OUTPUT -j EDGEMESH-OUTPUT
             EDGEMESH-PREROUTING: -d 127.0.0.0/8 ! -i lo -j RETURN, then -j EDGEMESH-TPROXY
             EDGEMESH-TPROXY: one TPROXY per UDP (service IP, port) → the transparent UDP
                 socket, with mark ``TPROXY_MARK``; then the NodePort jumps, to
             EDGEMESH-TPROXY-NODEPORTS: one TPROXY per UDP nodePort.
             EDGEMESH-OUTPUT -j EDGEMESH-MARK: one MARK per UDP (service IP, port), so this
                 node's own datagrams are routed (``ensure_tproxy_routing``: fwmark → table
                 237, a local default route on lo) back through PREROUTING, where TPROXY is.
    filter   INPUT -j EDGEMESH-INPUT              (inserted first)
             EDGEMESH-INPUT: one ACCEPT per DNAT target for packets our DNAT sent there
                 (``-m conntrack --ctstate DNAT``), and one for UDP carrying our mark.

The filter chain lets intercepted traffic through a host firewall that drops unsolicited input
(policy DROP, as on many routers), as the Go EdgeMesh's ``KUBE-NODEPORT-NON-LOCAL`` chain does;
nothing else reaches the listeners through it. As in kube-proxy, service-IP rules come first
and NodePorts last, so a service IP that happens to be local is matched by its own port.
Clients on this node reach NodePorts on 127.0.0.1 too (the listener is local, so no
``route_localnet`` is needed), but packets from the network for 127.0.0.0/8 are never
rewritten or diverted: DNAT before routing would let them past the kernel's martian check (the
hole of CVE-2020-8558); the mangle guard exempts only ``lo``, where this node's own packets
come back.

Updates scale with what changed (issue 16). ``ruleset`` computes the rules as a value: the
rules whose order matters (the hook chains, the NodePort jumps ending a chain) as a list, the
exact-match rules of each chain in ``SET_CHAINS`` as a set. The first sync, one after a failure
or drift, and one that changes the ordered part write everything (``render_full``: declaring a
chain flushes it, so our chains are replaced in one ``iptables-restore --noflush``
transaction per table and rules of others stay untouched); every other sync writes only the
rules that changed (``render_delta``: ``-D`` rule, ``-I chain 1`` before the jumps or ``-A``),
and nothing at all when nothing did — one Service changed among 5,000 is two rule lines.
``Rules.change`` does the same from the changed portals alone (no ruleset of every portal),
writing new rules in a first transaction and deletions in a second: with nf_tables, a ``-D``
makes ``iptables-restore`` read the whole chain (~0.2 s at 10,000 rules) where ``-I`` takes
~15 ms, so a new or changed Service is carried before the old rules are gone (the listener
already refuses what they lead to). ``Rules.check`` (the periodic resync) compares
``iptables-save`` with what was applied and forces a full rewrite when they differ. The jump
rules are checked against ``iptables-save`` at each full rewrite and added once (extra copies
from a crash or a second agent are removed), so any number of restarts leaves exactly one of
each.

Backends: the host's ``iptables`` may be nf_tables or legacy; ``detect_backend`` picks the one
that already holds rules (as kube-proxy's iptables-wrapper does), so we never add rules that
the host's tools cannot show.

IPv6, as kube-proxy does it: a separate ruleset with the same chain names, rendered by
``render_rules(..., family=6)`` and applied by a second ``Rules(family=6)`` with
``ip6tables-restore --noflush`` (its backend detected among ``ip6tables-legacy`` and
``ip6tables-nft`` the same way). Its loopback guard is ``::1/128`` (IPv6 has no
``route_localnet``, and the kernel drops packets for ``::1`` from the network anyway; from
the node itself ``[::1]:nodePort`` reaches the local listener as 127.0.0.1 does), its
NodePort jumps use the IPv6 ``nodePortAddresses`` ranges (none when the key lists only IPv4
ones, and vice versa), and DNAT targets are written ``[addr]:port``. The module
creates it only while it has IPv6 service addresses to serve; removal and ``edgemesh cleanup``
cover both families, all three tables and the TPROXY routing.
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from edgemesh.config import Config
from edgemesh.runtime import metrics, tasks

log = logging.getLogger(__name__)

SERVICES_CHAIN = "EDGEMESH-SERVICES"
NODEPORTS_CHAIN = "EDGEMESH-NODEPORTS"
HOOKS = (("PREROUTING", "EDGEMESH-PREROUTING"), ("OUTPUT", "EDGEMESH-OUTPUT"))
CHAINS = (SERVICES_CHAIN, *(chain for _, chain in HOOKS), NODEPORTS_CHAIN)
TPROXY_CHAIN = "EDGEMESH-TPROXY"
TPROXY_NODEPORTS_CHAIN = "EDGEMESH-TPROXY-NODEPORTS"
MARK_CHAIN = "EDGEMESH-MARK"
MANGLE_CHAINS = (*(chain for _, chain in HOOKS), TPROXY_CHAIN, TPROXY_NODEPORTS_CHAIN,
                 MARK_CHAIN)
INPUT_CHAIN = "EDGEMESH-INPUT"
FILTER_HOOKS = (("INPUT", INPUT_CHAIN),)
TABLES = {"nat": (HOOKS, CHAINS), "mangle": (HOOKS, MANGLE_CHAINS),
          "filter": (FILTER_HOOKS, (INPUT_CHAIN,))}
# chains whose rules are exact matches, so order among them does not matter: updated rule by
# rule; True: new rules are inserted first (the chain ends with ordered jumps)
SET_CHAINS = {SERVICES_CHAIN: ("nat", True), NODEPORTS_CHAIN: ("nat", False),
              TPROXY_CHAIN: ("mangle", True), TPROXY_NODEPORTS_CHAIN: ("mangle", False),
              MARK_CHAIN: ("mangle", False), INPUT_CHAIN: ("filter", False)}
NODE = ""  # Portal.ip of a NodePort: any local address of this node
LOOPBACK_GUARD = "-A EDGEMESH-PREROUTING -d 127.0.0.0/8 -j RETURN"
LOOPBACK_GUARD6 = "-A EDGEMESH-PREROUTING -d ::1/128 -j RETURN"
ROUTE_PROTO = "237"  # marks the service-CIDR routes we add, so cleanup removes only ours
TPROXY_MARK = "0x2000/0x2000"  # unused by kube-proxy (0x4000, 0x8000) and Cilium (0x0f00)
TPROXY_TABLE = "237"  # the routing table sending marked packets to the local stack

SYNC_SECONDS = metrics.histogram("edgemesh_proxy_iptables_sync_seconds",
                                 "Time to render and apply the interception rules.")
SYNC_FAILURES = metrics.counter("edgemesh_proxy_iptables_sync_failures_total",
                                "iptables-restore runs that failed.")
RULE_OPERATIONS = metrics.counter("edgemesh_proxy_iptables_rule_operations_total",
                                  "Rules written (added, inserted or deleted) by successful "
                                  "syncs: a change writes only the rules it changes.")


@dataclass(frozen=True, order=True, slots=True)
class Portal:
    """Traffic to ``ip:port/protocol`` goes to the listener at ``to_ip:to_port``.

    ``ip`` is a ClusterIP, externalIP or load-balancer IP (IPv4, or IPv6 in the IPv6 ruleset),
    or ``NODE`` for a NodePort (``port`` is then the nodePort and the address any local one of
    the ruleset's family within nodePortAddresses). ``tproxy``: led there by TPROXY (UDP to
    the transparent listener) rather than by DNAT.
    """
    ip: str
    port: int
    protocol: str  # "tcp" | "udp"
    to_ip: str
    to_port: int
    comment: str = ""
    tproxy: bool = False
    last_port: int = 0  # with ``ip`` a CIDR: ports ``port``..``last_port`` (Edge CNI ranges)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "").replace('"', "")[:250] + '"'


def _host(ip: str) -> str:
    """``ip/32``, or ``ip/128`` for IPv6 (as ``iptables-save`` and ``ip6tables-save`` show);
    a CIDR as it is."""
    if "/" in ip:
        return ip
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def _match(chain: str, p: Portal) -> str:
    dest = f" -d {_host(p.ip)}" if p.ip != NODE else ""
    ports = f"{p.port}:{p.last_port}" if p.last_port and p.last_port != p.port else p.port
    return f"-A {chain}{dest} -p {p.protocol} -m {p.protocol} --dport {ports}"


def _comment(p: Portal) -> str:
    return f" -m comment --comment {_quote(p.comment)}" if p.comment else ""


def _dnat(chain: str, p: Portal) -> str:
    to = f"[{p.to_ip}]" if ":" in p.to_ip else p.to_ip
    return f"{_match(chain, p)}{_comment(p)} -j DNAT --to-destination {to}:{p.to_port}"


def _tproxy(chain: str, p: Portal) -> str:
    return (f"{_match(chain, p)}{_comment(p)} -j TPROXY --on-port {p.to_port} "
            f"--on-ip {p.to_ip} --tproxy-mark {TPROXY_MARK}")


def _mark(p: Portal) -> str:
    return f"{_match(MARK_CHAIN, p)}{_comment(p)} -j MARK --set-xmark {TPROXY_MARK}"


def node_port_matches(node_port_addresses: Sequence[str], family: int = 4) -> list[str]:
    """Destination matches of ``family``'s jumps to the NodePort chain: one per range of that
    family (deduplicated, host bits cleared), or a single empty one (any local address) when
    no range at all is given or one is ``0.0.0.0/0`` (``::/0``); none (no NodePorts in this
    family) when every range is of the other family. Ranges are CIDRs (the config checks)."""
    nets = sorted({n for n in map(_network, node_port_addresses) if n.version == family})
    if not node_port_addresses or any(n.prefixlen == 0 for n in nets):
        return [""]
    return [f"-d {n} " for n in nets]


def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(cidr, strict=False)


def node_ports_enabled(node_port_addresses: Sequence[str], family: int) -> bool:
    """Whether ``family``'s ruleset has NodePorts at all (see ``node_port_matches``)."""
    return bool(node_port_matches(node_port_addresses, family))


@dataclass(frozen=True)
class Ruleset:
    """The rules of one family as a value: ``ordered`` holds, per table, the rules whose order
    matters (the hook chains; the NodePort jumps that end a set chain); ``sets`` the rules of
    each chain in ``SET_CHAINS`` (DNAT, TPROXY, MARK, ACCEPT: exact matches) as restore lines."""
    ordered: tuple[tuple[str, str], ...]  # (table, line)
    sets: Mapping[str, AbstractSet[str]]  # chain → its lines

    def __len__(self) -> int:
        return len(self.ordered) + sum(map(len, self.sets.values()))


def ruleset(portals: list[Portal], node_port_addresses: Sequence[str] = (),
            family: int = 4) -> Ruleset:
    """The rules making our chains hold exactly ``portals`` (see the module docstring)."""
    guard = LOOPBACK_GUARD6 if family == 6 else LOOPBACK_GUARD
    matches = node_port_matches(node_port_addresses, family)
    sets: dict[str, set[str]] = {chain: set() for chain in SET_CHAINS}
    listeners = set()
    for p in portals:  # one pass, each portal's lines made once and remembered (_lines_of)
        if p.ip == NODE and not matches:
            continue
        for chain, line in _lines_of(p):
            sets[chain].add(line)
        if not p.tproxy:
            listeners.add((p.to_ip, p.protocol, p.to_port))
    ordered = [("nat", guard), *(("nat", f"-A {chain} -j {SERVICES_CHAIN}") for _, chain in HOOKS)]
    ordered += [("nat", f"-A {SERVICES_CHAIN} {m}-m addrtype --dst-type LOCAL "
                 f"-j {NODEPORTS_CHAIN}") for m in (matches if sets[NODEPORTS_CHAIN] else ())]
    # locally generated packets reach PREROUTING again through lo: let them in there
    ordered += [("mangle", guard.replace(" -j RETURN", " ! -i lo -j RETURN")),
                ("mangle", f"-A EDGEMESH-PREROUTING -j {TPROXY_CHAIN}"),
                ("mangle", f"-A EDGEMESH-OUTPUT -j {MARK_CHAIN}")]
    ordered += [("mangle", f"-A {TPROXY_CHAIN} {m}-m addrtype --dst-type LOCAL "
                 f"-j {TPROXY_NODEPORTS_CHAIN}")
                for m in (matches if sets[TPROXY_NODEPORTS_CHAIN] else ())]
    sets[INPUT_CHAIN] = {_accept(*target) for target in listeners}
    if sets[TPROXY_CHAIN] or sets[TPROXY_NODEPORTS_CHAIN]:
        sets[INPUT_CHAIN].add(TPROXY_ACCEPT)
    return Ruleset(tuple(ordered), {chain: frozenset(lines) for chain, lines in sets.items()})


TPROXY_ACCEPT = f"-A {INPUT_CHAIN} -p udp -m mark --mark {TPROXY_MARK} -j ACCEPT"


def _accept(ip: str, proto: str, port: int) -> str:
    """The filter rule letting DNATed traffic reach the listener at ``ip:port``."""
    return (f"-A {INPUT_CHAIN} -d {_host(ip)} -p {proto} -m {proto} --dport {port} "
            f"-m conntrack --ctstate DNAT -j ACCEPT")


@functools.lru_cache(maxsize=1 << 17)
def _lines_of(p: Portal) -> tuple[tuple[str, str], ...]:
    """(chain, restore line) of each rule a portal needs; remembered, as a sync sees mostly
    the portals it saw last time."""
    if not p.tproxy:
        chain = NODEPORTS_CHAIN if p.ip == NODE else SERVICES_CHAIN
        return ((chain, _dnat(chain, p)),)
    if p.ip == NODE:  # node ports are local addresses: their packets go through lo unmarked
        return ((TPROXY_NODEPORTS_CHAIN, _tproxy(TPROXY_NODEPORTS_CHAIN, p)),)
    return ((TPROXY_CHAIN, _tproxy(TPROXY_CHAIN, p)), (MARK_CHAIN, _mark(p)))


def render_full(rules: Ruleset, hook_lines: Sequence[str] = (),
                filter_hook_lines: Sequence[str] = (),
                mangle_hook_lines: Sequence[str] = ()) -> str:
    """The ``iptables-restore --noflush`` input that replaces our chains with ``rules``.

    The ``*_hook_lines`` (from ``hook_fixes`` for each table) go into the same transaction
    as each table's rules, so rules and the jumps into them change together: no moment with
    rules but no hook, or a hook twice.
    """
    fixes = {"nat": hook_lines, "mangle": mangle_hook_lines, "filter": filter_hook_lines}
    lines: list[str] = []
    for table, (_, chains) in TABLES.items():
        ordered = [line for t, line in rules.ordered if t == table]
        lines += [f"*{table}", *(f":{chain} - [0:0]" for chain in chains)]
        tails = [line for line in ordered if line.split()[1] in SET_CHAINS]
        lines += [line for line in ordered if line not in tails]
        for chain in chains:
            if chain in SET_CHAINS:
                lines += sorted(rules.sets[chain], key=_portal_order)
                # last, as in kube-proxy: a local service IP is matched by its own port
                lines += _in_chain(tails, chain)
        lines += [*fixes[table], "COMMIT"]
    return "\n".join(lines) + "\n"


def _portal_order(line: str) -> tuple[str, int, str, str]:
    """Lines in the order of their portals: address, port, protocol."""
    words = line.split()
    ip = words[words.index("-d") + 1] if "-d" in words else ""
    port = int(words[words.index("--dport") + 1].split(":")[0]) if "--dport" in words else 0
    proto = words[words.index("-p") + 1] if "-p" in words else ""
    return ip, port, proto, line


def render_delta(old: Ruleset, new: Ruleset) -> str | None:
    """The restore input turning the applied ``old`` into ``new`` rule by rule: ``-D`` for
    each rule gone, ``-I chain 1`` (before the NodePort jumps, which stay last) or ``-A``
    for each new one; "" when nothing changed; None when the ordered part changed and the
    chains must be rewritten whole (``render_full``)."""
    if old.ordered != new.ordered:
        return None
    out = []
    for table in TABLES:
        ops = []
        for chain, (t, insert) in SET_CHAINS.items():
            if t == table:
                ops += _changes(chain, old.sets[chain], new.sets[chain], insert)
        if ops:
            out += [f"*{table}", *ops, "COMMIT"]
    return "\n".join(out) + "\n" if out else ""


def _changes(chain: str, old: AbstractSet[str], new: AbstractSet[str],
             insert: bool = False) -> list[str]:
    prefix = f"-A {chain} "
    gone = sorted(f"-D {chain} {line[len(prefix):]}" for line in old - new)
    add = f"-I {chain} 1 " if insert else prefix
    return gone + sorted(f"{add}{line[len(prefix):]}" for line in new - old)


def render_rules(portals: list[Portal], hook_lines: Sequence[str] = (),
                 node_port_addresses: Sequence[str] = (),
                 filter_hook_lines: Sequence[str] = (), family: int = 4) -> str:
    """``render_full`` of the ``ruleset`` of ``portals``: ``node_port_addresses`` limits
    NodePorts to local addresses in the ranges of ``family``; ``family=6`` renders the
    ``ip6tables-restore`` input for IPv6 portals."""
    return render_full(ruleset(portals, node_port_addresses, family), hook_lines,
                       filter_hook_lines)


def drifted(rules: Ruleset, saved: dict[str, str]) -> bool:
    """Whether our chains in ``saved`` (``iptables-save -t`` output by table) differ from
    ``rules`` (a rule missing, extra or out of order), or a jump into them is missing or
    doubled."""
    for table, (hooks, chains) in TABLES.items():
        text = saved.get(table, "")
        ordered = [line for t, line in rules.ordered if t == table]
        if hook_fixes(text, hooks):
            return True
        # -save quotes a comment only when it needs quotes: compare without any
        mine = [line.replace('"', "") for line in text.splitlines()
                if line.startswith("-A EDGEMESH-")]
        for chain in chains:
            have, want = _in_chain(mine, chain), _in_chain(ordered, chain)
            if chain not in SET_CHAINS or SET_CHAINS[chain][0] != table:
                if have != want:
                    return True
                continue
            head = have[:len(have) - len(want)]
            if have[len(head):] != want or _differ(head, rules.sets[chain]):
                return True
    return False


def _in_chain(lines: Sequence[str], chain: str) -> list[str]:
    return [line for line in lines if line.startswith(f"-A {chain} ")]


def _differ(lines: list[str], want: AbstractSet[str]) -> bool:
    return len(lines) != len(want) or set(lines) != {line.replace('"', "") for line in want}


def hook_rule(parent: str, chain: str) -> str:
    return f"-A {parent} -j {chain}"


def hook_fixes(saved: str, hooks: Sequence[tuple[str, str]] = HOOKS) -> list[str]:
    """Restore lines leaving exactly one of each jump rule in ``hooks``, given the table's
    ``iptables-save -t nat`` (or ``-t filter`` with ``FILTER_HOOKS``)."""
    lines = saved.splitlines()
    fixes = []
    for parent, chain in hooks:
        count = sum(1 for line in lines if line.strip() == hook_rule(parent, chain))
        if count == 0:
            fixes.append(f"-I {parent} 1 -j {chain}")
        fixes.extend(f"-D {parent} -j {chain}" for _ in range(count - 1))
    return fixes


def cleanup_commands(saved: str, table: str = "nat") -> list[list[str]]:
    """iptables arguments removing every jump rule and chain of ours found in ``saved``
    (``iptables-save -t`` of ``table``: nat, mangle or filter)."""
    hooks, chains = TABLES[table]
    lines = saved.splitlines()
    cmds: list[list[str]] = []
    for parent, chain in hooks:
        cmds.extend(["-t", table, "-D", parent, "-j", chain]
                    for line in lines if line.strip() == hook_rule(parent, chain))
    present = [c for c in chains if f":{c} " in saved]
    cmds.extend(["-t", table, "-F", c] for c in present)
    cmds.extend(["-t", table, "-X", c] for c in present)
    return cmds


# ---- I/O --------------------------------------------------------------------------------------

def _save(binary: str, table: str = "nat") -> str:
    try:
        return tasks.run([f"{binary}-save", "-t", table], timeout=10,
                         check=False).stdout.decode(errors="replace")
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _save_tables(binary: str) -> dict[str, str]:
    """Our tables as ``iptables-save -t`` shows each, from one ``iptables-save`` run."""
    out: dict[str, list[str]] = {table: [] for table in TABLES}
    current: list[str] = []
    for line in _save_all(binary).splitlines(keepends=True):
        if line.startswith("*"):
            current = out.get(line[1:].strip(), [])
        current.append(line)
    return {table: "".join(lines) for table, lines in out.items()}


def _save_all(binary: str) -> str:
    try:
        return tasks.run([f"{binary}-save"], timeout=10, check=False).stdout.decode(
            errors="replace")
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _rule_count(binary: str) -> int:
    if shutil.which(f"{binary}-save") is None:
        return -1
    try:
        out = tasks.run([f"{binary}-save"], timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return -1
    return sum(1 for line in out.splitlines() if line.startswith(b"-A "))


def detect_backend(family: int = 4) -> str:
    """``iptables-legacy`` when the legacy tables hold more rules than nf_tables, else the
    nf_tables variant (or plain ``iptables`` where the variants are not installed); the
    ``ip6tables`` ones for ``family=6``."""
    base = "ip6tables" if family == 6 else "iptables"
    legacy, nft = _rule_count(f"{base}-legacy"), _rule_count(f"{base}-nft")
    if legacy > max(nft, 0):
        return f"{base}-legacy"
    if nft >= 0:
        return f"{base}-nft"
    return base


class Rules:
    """Applies rendered rules with one backend and keeps the jump rules single (``family=6``:
    the IPv6 ruleset, with ``ip6tables``).

    The first sync, and any after a failure, drift or a change of the ordered part, rewrites
    our chains whole (and checks the jump rules against ``iptables-save``); every other sync
    applies only the rules that changed (``render_delta``), and none at all when nothing did.
    ``check`` compares the kernel's rules with the last applied ones (the periodic repair).
    """

    def __init__(self, binary: str | None = None, family: int = 4) -> None:
        self.family = family
        self.binary = binary or detect_backend(family)
        self.applied: Ruleset | None = None  # what the kernel holds, as far as we know
        self.operations = 0  # rule lines written by the last sync (0: nothing to change)
        # how many applied portals lead to each DNAT target (its INPUT rule goes with the last)
        self._targets: dict[tuple[str, str, int], int] = {}

    def sync(self, portals: list[Portal], node_port_addresses: Sequence[str] = ()) -> None:
        """Make the chains hold exactly ``portals`` and the hooks exist once."""
        started = time.monotonic()
        want = ruleset(portals, node_port_addresses, self.family)
        text = render_delta(self.applied, want) if self.applied is not None else None
        if text == "":
            self.operations = 0
            return
        if text is None:
            saved = _save_tables(self.binary)
            fixes = {table: hook_fixes(saved[table], hooks)
                     for table, (hooks, _) in TABLES.items()}
            text = render_full(want, fixes["nat"], fixes["filter"], fixes["mangle"])
        self._apply([text], started)
        # kept as sets ``change`` updates in place
        self.applied = Ruleset(want.ordered, {c: set(v) for c, v in want.sets.items()})
        matches = node_port_matches(node_port_addresses, self.family)
        self._targets = _targets(p for p in portals if p.ip != NODE or matches)

    def change(self, gone: Iterable[Portal], new: Iterable[Portal],
               node_port_addresses: Sequence[str] = ()) -> bool:
        """Turn the applied rules of the ``gone`` portals into those of the ``new`` ones, rule
        by rule, without looking at any other portal: a change costs what it changed. False
        (nothing done) when that is not enough — nothing applied yet, or the ordered part
        would change (a first or last NodePort or UDP portal) — and the caller must ``sync``
        the whole state."""
        applied = self.applied
        if applied is None:
            return False
        started = time.monotonic()
        matches = node_port_matches(node_port_addresses, self.family)
        lines: dict[str, tuple[set[str], set[str]]] = {}  # chain → (removed, added)
        targets: dict[tuple[str, str, int], int] = {}  # change in each target's count
        for portals, step in ((gone, -1), (new, 1)):
            for p in portals:
                if p.ip == NODE and not matches:
                    continue
                for chain, line in _lines_of(p):
                    removed, added = lines.setdefault(chain, (set(), set()))
                    (removed if step < 0 else added).add(line)
                if not p.tproxy:
                    target = (p.to_ip, p.protocol, p.to_port)
                    targets[target] = targets.get(target, 0) + step
        for chain, (removed, added) in lines.items():
            both = removed & added
            have = applied.sets[chain]
            removed.difference_update(both)
            added.difference_update(both)
            removed.intersection_update(have)
            added.difference_update(have)
        for chain in (NODEPORTS_CHAIN, TPROXY_NODEPORTS_CHAIN, TPROXY_CHAIN):
            removed, added = lines.get(chain, (set(), set()))
            if bool(applied.sets[chain]) != bool(len(applied.sets[chain]) - len(removed)
                                                  + len(added)):
                return False  # a NodePort jump or the UDP mark's ACCEPT comes or goes
        counts = dict(self._targets)
        accept_gone, accept_new = set(), set()
        for target, step in targets.items():
            before = counts.get(target, 0)
            counts[target] = before + step
            if before > 0 >= counts[target]:
                accept_gone.add(_accept(*target))
                del counts[target]
            elif before <= 0 < counts[target]:
                accept_new.add(_accept(*target))
        if accept_gone or accept_new:
            lines[INPUT_CHAIN] = (accept_gone & applied.sets[INPUT_CHAIN],
                                  accept_new - applied.sets[INPUT_CHAIN])
        # new rules first, in a transaction of their own: with nf_tables, a -D makes
        # iptables-restore read the whole chain (~0.2 s at 10,000 rules) while -I/-A do not,
        # so the traffic of a new or changed Service is carried before the old rules go
        # (the listener already refuses what they still lead to: its steering entry is gone)
        texts = []
        for pick in (1, 0):
            out = []
            for table in TABLES:
                ops = []
                for chain, (t, insert) in SET_CHAINS.items():
                    if t == table and chain in lines:
                        ops += _changes(chain, frozenset(lines[chain][0] if pick == 0 else ()),
                                        frozenset(lines[chain][1] if pick == 1 else ()),
                                        insert)
                if ops:
                    out += [f"*{table}", *ops, "COMMIT"]
            if out:
                texts.append("\n".join(out) + "\n")
        self.operations = 0
        if texts:
            self._apply(texts, started)
            for chain, (removed, added) in lines.items():
                mutable = applied.sets[chain]
                assert isinstance(mutable, set)
                mutable -= removed
                mutable |= added
            self.applied = applied
        self._targets = counts
        return True

    def _apply(self, texts: list[str], started: float) -> None:
        """Run ``iptables-restore --noflush`` on each text in turn; one sync observed."""
        self.applied = None  # unknown until the restores succeed
        for text in texts:
            try:
                tasks.run([f"{self.binary}-restore", "-w", "5", "--noflush"],
                          input=text.encode(), timeout=30)
            except subprocess.CalledProcessError as e:
                SYNC_FAILURES.inc()
                if self.family == 4:  # IPv6: the module logs it once and keeps serving IPv4
                    log.error("iptables sync failed: %s",
                              (e.stderr or b"").decode(errors="replace"))
                raise
        self.operations = sum(1 for text in texts for line in text.splitlines()
                              if line[:2] in ("-A", "-D", "-I"))
        RULE_OPERATIONS.inc(self.operations)
        SYNC_SECONDS.observe(time.monotonic() - started)

    def check(self) -> bool:
        """False (and the next sync rewrites the chains whole) when the kernel's rules are not
        the ones last applied: a rule or a jump removed, added or reordered by someone else."""
        if self.applied is None:
            return False
        if drifted(self.applied, _save_tables(self.binary)):
            log.warning("%s rules drifted from what the proxy applied; rewriting them",
                        self.binary)
            self.applied = None
            return False
        return True

    def remove(self) -> None:
        remove_from(self.binary)
        self.applied = None


def _targets(portals: Iterable[Portal]) -> dict[tuple[str, str, int], int]:
    """How many DNATed portals lead to each listener."""
    out: dict[tuple[str, str, int], int] = {}
    for p in portals:
        if not p.tproxy:
            target = (p.to_ip, p.protocol, p.to_port)
            out[target] = out.get(target, 0) + 1
    return out


def removal_input(saved: dict[str, str]) -> str:
    """One ``iptables-restore --noflush`` input doing ``cleanup_commands`` for every table in
    ``saved`` (``iptables-save -t`` output by table): jumps deleted, then our chains flushed,
    then deleted — one transaction instead of a command each."""
    out = []
    for table, text in saved.items():
        cmds = cleanup_commands(text, table)
        if cmds:
            out += [f"*{table}", *(" ".join(c[2:]) for c in cmds), "COMMIT"]
    return "\n".join(out) + "\n" if out else ""


def remove_from(binary: str) -> None:
    saved = _save_tables(binary)
    text = removal_input(saved)
    if not text:
        return
    try:
        tasks.run([f"{binary}-restore", "-w", "5", "--noflush"], input=text.encode(),
                  timeout=30)
        return
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        log.debug("removing rules in one transaction failed (%s); one by one", e)
    for table, text in saved.items():
        for args in cleanup_commands(text, table):
            tasks.run([binary, "-w", "5", *args], timeout=10, check=False)


def of_family(cidrs: Sequence[str], family: int) -> list[str]:
    """The ranges among ``cidrs`` of IP version ``family``."""
    return [c for c in cidrs if _network(c).version == family]


def ensure_routes(cidrs: list[str], device: str) -> None:
    """Routes for the service ranges, so connect() to a ClusterIP reaches the nat OUTPUT hook."""
    for cidr in cidrs:
        tasks.run(["ip", "route", "replace", cidr, "dev", device, "proto", ROUTE_PROTO],
                  timeout=10)


def remove_routes(cidrs: list[str]) -> None:
    for cidr in cidrs:
        tasks.run(["ip", "route", "del", cidr, "proto", ROUTE_PROTO], timeout=10, check=False)


def ensure_tproxy_routing(family: int) -> None:
    """Packets carrying ``TPROXY_MARK`` are delivered locally (table ``TPROXY_TABLE``: a
    ``local`` default route on lo), once: TPROXY'd packets from other hosts, and locally
    generated ones the MARK chain sends back through lo to meet TPROXY in PREROUTING."""
    ip = ["ip", "-6"] if family == 6 else ["ip", "-4"]
    rule = ["fwmark", TPROXY_MARK, "lookup", TPROXY_TABLE]
    shown = tasks.run([*ip, "rule", "show"], timeout=10).stdout.decode(errors="replace")
    if f"fwmark {TPROXY_MARK} lookup {TPROXY_TABLE}" not in shown:
        tasks.run([*ip, "rule", "add", *rule], timeout=10)
    tasks.run([*ip, "route", "replace", "local", "::/0" if family == 6 else "0.0.0.0/0",
               "dev", "lo", "table", TPROXY_TABLE], timeout=10)


def remove_tproxy_routing(family: int) -> None:
    ip = ["ip", "-6"] if family == 6 else ["ip", "-4"]
    for _ in range(16):  # every copy (a crash between add and a check may leave two)
        if tasks.run([*ip, "rule", "del", "fwmark", TPROXY_MARK, "lookup", TPROXY_TABLE],
                     timeout=10, check=False).returncode != 0:
            break
    tasks.run([*ip, "route", "flush", "table", TPROXY_TABLE], timeout=10, check=False)


def cleanup(config: Config) -> None:
    """``edgemesh cleanup``: our chains, jump rules and routes, from every backend present,
    IPv4 and IPv6."""
    for binary in ("iptables-nft", "iptables-legacy", "iptables",
                   "ip6tables-nft", "ip6tables-legacy", "ip6tables"):
        if shutil.which(binary) and shutil.which(f"{binary}-save"):
            remove_from(binary)
    if shutil.which("ip"):
        remove_routes(config.modules.edgeProxy.serviceCIDR)
        for family in (4, 6):
            remove_tproxy_routing(family)
