"""Build edge networks out of network namespaces, veth pairs and bridges (see docs/specs/lab.md).

A ``Lab`` owns every namespace it makes (names carry a per-lab prefix, so parallel test runs
never collide) and deletes them on ``close()``; deleting a namespace removes its links too.

    lab = Lab()
    inet = lab.switch("inet", "198.18.0.254/24")           # the "internet" bridge
    a = lab.site("a", inet, wan="198.18.0.1/24", lan="192.168.10.1/24")  # NAT router
    n1 = lab.host("n1", a.lan, "192.168.10.2/24", gw="192.168.10.1")
    n1.run("ip", "addr")                                   # any command inside n1
    proc = n1.popen(["edgemesh", "agent", ...])            # a process inside n1
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

_COUNTER = itertools.count()


def can_run() -> str:
    """"" if namespaces can be built here, else the reason they cannot (for pytest.skip)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return ""


ANSWER_SCRIPT = """while IFS= read -r line; do
  [ "$(printf %s "$line" | tr -d '\\r')" ] || break
done
printf '%s\\n' "$ANSWER"
"""
_answer_path: list[str] = []


def _answer_script() -> str:
    """The shell script ``Netns.answer_server`` runs, written once per test process."""
    if not _answer_path:
        fd, path = tempfile.mkstemp(prefix="edgemesh-answer-", suffix=".sh")
        with os.fdopen(fd, "w") as f:
            f.write(ANSWER_SCRIPT)
        _answer_path.append(path)
    return _answer_path[0]


def sh(*argv: str, check: bool = True, timeout: float = 30,
       input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=input is None, timeout=timeout,
                            input=input)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): "
                           f"{result.stderr or result.stdout}")
    return result  # type: ignore[return-value]


@dataclass
class Netns:
    name: str
    lab: "Lab"
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, *argv: str, check: bool = True, timeout: float = 30,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.name, *argv, check=check, timeout=timeout,
                  input=input)

    def popen(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *argv],
                                **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def sysctl(self, key: str, value: str) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def answer_server(self, listen: str, text: str) -> subprocess.Popen[bytes]:
        """socat on ``listen`` (a socat listen address, e.g. ``TCP-LISTEN:80,bind=1.2.3.4``)
        answering every connection with one line, ``text``, after reading the client's request
        head up to its blank line: closing with the request unread would send an RST that can
        overtake the answer (curl: "empty reply from server")."""
        return self.popen(["socat", f"{listen},reuseaddr,fork", f"SYSTEM:sh {_answer_script()}"],
                          env={**os.environ, "ANSWER": text})  # socat splits at ':' and ','

    def wait_listening(self, *addrs: str, timeout: float = 20) -> None:
        """Until TCP listeners or bound UDP sockets exist for ``addrs`` ("ip:port",
        "[ip6]:port"): servers started with ``popen`` are not listening yet when it returns."""
        want = set(addrs)
        wait_for(lambda: want <= {line.split()[4] for line in self.run(
            "ss", "-Hltun").stdout.splitlines()}, timeout, 0.1,
            what=f"listeners on {sorted(want)} in {self.name}")

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        self.procs.clear()


@dataclass
class Switch:
    """A bridge in its own namespace: an L2 segment (a LAN or the internet)."""
    ns: Netns
    bridge: str = "br0"
    ports: int = 0


@dataclass
class Site:
    router: Netns
    lan: Switch
    wan_ip: str
    lan_ip: str


class Lab:
    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"em{os.getpid() % 100000}x{next(_COUNTER)}"
        self.namespaces: list[Netns] = []

    # ---- building -----------------------------------------------------------------------------

    def netns(self, name: str) -> Netns:
        full = f"{self.prefix}-{name}"
        sh("ip", "netns", "add", full)
        ns = Netns(full, self)
        self.namespaces.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")
        return ns

    def switch(self, name: str, address: str | None = None) -> Switch:
        """A bridge namespace; ``address`` (CIDR) gives the bridge itself an IP."""
        ns = self.netns(name)
        ns.run("ip", "link", "add", "br0", "type", "bridge")
        ns.run("ip", "link", "set", "br0", "up")
        ns.run("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0", check=False)
        if address:
            ns.run("ip", "addr", "add", address, "dev", "br0")
        return Switch(ns)

    def plug(self, ns: Netns, switch: Switch, ifname: str, address: str | None) -> None:
        """Connect ``ns`` to ``switch`` with a veth pair, ``ifname`` on the ``ns`` side."""
        switch.ports += 1
        peer = f"p{switch.ports}"
        sh("ip", "link", "add", "name", ifname, "netns", ns.name, "type", "veth", "peer",
           "name", peer, "netns", switch.ns.name)
        switch.ns.run("ip", "link", "set", peer, "master", switch.bridge, "up")
        ns.run("ip", "link", "set", ifname, "up")
        if address:
            ns.run("ip", "addr", "add", address, "dev", ifname)

    def host(self, name: str, switch: Switch, address: str, gw: str | None = None,
             ifname: str = "eth0") -> Netns:
        ns = self.netns(name)
        self.plug(ns, switch, ifname, address)
        if gw:
            ns.run("ip", "route", "add", "default", "via", gw)
        return ns

    def site(self, name: str, internet: Switch, wan: str, lan: str, *,
             nat: str = "masquerade", drop_inbound: bool = True) -> Site:
        """A NAT router with a WAN leg on ``internet`` and a fresh LAN switch behind it.

        ``nat``: ``masquerade`` (port-preserving: punchable), ``random-fully`` (symmetric-like)
        or ``none``. ``drop_inbound`` drops unsolicited packets arriving on the WAN, as home
        and OpenWrt routers do.
        """
        router = self.netns(f"{name}-r")
        lan_switch = self.switch(f"{name}-lan")
        self.plug(router, internet, "wan0", wan)
        self.plug(router, lan_switch, "lan0", lan)
        router.sysctl("net.ipv4.ip_forward", "1")
        lan_net = _network(lan)
        if nat != "none":
            extra = ["--random-fully"] if nat == "random-fully" else []
            router.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", lan_net, "-o", "wan0",
                       "-j", "MASQUERADE", *extra)
        if drop_inbound:
            for chain in ("INPUT", "FORWARD"):
                router.run("iptables", "-A", chain, "-i", "wan0", "-m", "conntrack", "--ctstate",
                           "ESTABLISHED,RELATED", "-j", "ACCEPT")
                router.run("iptables", "-A", chain, "-i", "wan0", "-j", "DROP")
        return Site(router=router, lan=lan_switch, wan_ip=wan.split("/")[0],
                    lan_ip=lan.split("/")[0])

    # ---- tearing down -------------------------------------------------------------------------

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            ns.kill_all()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "delete", ns.name, check=False)
        self.namespaces.clear()

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _network(cidr: str) -> str:
    import ipaddress
    return str(ipaddress.ip_interface(cidr).network)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value; raise with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # the thing may not be up yet
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}" + (f": {last_exc}" if last_exc else ""))
