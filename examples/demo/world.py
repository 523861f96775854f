"""A small edge world in network namespaces, left running to explore (needs root).

    python -m examples.demo.world up       # build it, start everything, show it working
    python -m examples.demo.world status   # what is running; `edgemesh status` on a1
    python -m examples.demo.world down     # kill its processes, delete its namespaces

Every namespace is named ``emdemo-*``; logs, keys and the PSK live in /tmp/edgemesh-demo.

    outside 198.18.0.100 ─┐
    relay   198.18.0.10  ─┤  (edgemesh server)
    cloud   198.18.0.20  ─┤  agent; pods web-cloud, ws-cloud
    gateway 198.18.0.30  ─┤  edgemesh gateway on :8080
                          internet 198.18.0.0/24
    site A router 198.18.0.1 ─┤ NAT ├─ LAN 192.168.10.0/24: a1 .2 (client), a2 .3 (web-a2)
    site B router 198.18.0.2 ─┤ NAT ├─ LAN 192.168.20.0/24: b1 .2 (web-b1, echo-b1)

    Edge CNI Pods, each in a namespace of its own behind its node (a veth, node side .1/24):
    db-0 10.244.2.10 on b1, db-1 10.244.3.10 in the cloud (the StatefulSet-like `db`)

The routers masquerade their LAN and drop unsolicited inbound traffic, as home routers do.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time

from tests.netlab import Lab, Netns, sh
from tests.procs import ROOT, edgemesh_argv

# the environment overrides exist for tests/e2e/test_demo.py (it must not touch a user's demo)
PREFIX = os.environ.get("EDGEMESH_DEMO_PREFIX", "emdemo")
STATE = os.environ.get("EDGEMESH_DEMO_STATE", "/tmp/edgemesh-demo")
MANIFESTS = os.path.join(ROOT, "examples", "demo", "manifests")
SERVER = "198.18.0.10:20004"
GATEWAY = "198.18.0.30:8080"
ADMIN = "127.0.0.1:10557"
DNS_IP = "169.254.96.16"
VENV_EDGEMESH = ".venv/bin/edgemesh"
TOOLS = ("ip", "iptables", "curl", "dig", "socat")


@dataclasses.dataclass(frozen=True)
class Pod:
    """One demo Pod: its IP (on the node's lo) and the command that serves it."""
    name: str
    ip: str
    argv: tuple[str, ...]


def _py_pod(kind: str, name: str, ip: str, port: int) -> Pod:
    return Pod(name, ip, (sys.executable, "-m", "examples.demo.pods", kind, ip, str(port), name))


PODS: dict[str, list[Pod]] = {
    "a1": [],
    "a2": [_py_pod("http", "web-a2", "172.17.12.10", 8080)],
    "b1": [_py_pod("http", "web-b1", "172.17.21.10", 8080),
           Pod("echo-b1", "172.17.21.11",
               ("socat", "TCP-LISTEN:7000,bind=172.17.21.11,reuseaddr,fork", "SYSTEM:cat")),
           Pod("echo-b1-udp", "172.17.21.11",
               ("socat", "UDP4-RECVFROM:7001,bind=172.17.21.11,fork", "SYSTEM:cat"))],
    "cloud": [_py_pod("http", "web-cloud", "172.17.31.10", 8080),
              _py_pod("ws", "ws-cloud", "172.17.31.11", 8765)],
}
# Edge CNI Pods: a namespace each, behind a veth of their node (node side ``NET.1/24``)
NET_PODS: dict[str, list[Pod]] = {
    "b1": [_py_pod("http", "db-0", "10.244.2.10", 8080)],
    "cloud": [_py_pod("http", "db-1", "10.244.3.10", 8080)],
}
AGENT_CONFIG = "modules:\n  edgeCNI: {enable: true}\n"  # remote Pod IPs through the tunnel
RESOLV_CONF = (f"nameserver {DNS_IP}\nsearch demo.svc.cluster.local svc.cluster.local "
               "cluster.local\noptions ndots:5\n")


# ---- building ---------------------------------------------------------------------------------

class World:
    """Builds the namespaces and starts every process detached (they outlive this program)."""

    def __init__(self) -> None:
        self.lab = Lab(prefix=PREFIX)
        self.ns: dict[str, Netns] = {}
        self.psk = os.path.join(STATE, "psk")

    def build_network(self) -> None:
        lab = self.lab
        inet = lab.switch("inet", "198.18.0.254/24")
        for name, ip in (("relay", "198.18.0.10"), ("cloud", "198.18.0.20"),
                         ("gateway", "198.18.0.30"), ("outside", "198.18.0.100")):
            self.ns[name] = lab.host(name, inet, f"{ip}/24")
        site_a = lab.site("a", inet, wan="198.18.0.1/24", lan="192.168.10.1/24")
        site_b = lab.site("b", inet, wan="198.18.0.2/24", lan="192.168.20.1/24")
        for name, site, ip in (("a1", site_a, "192.168.10.2"), ("a2", site_a, "192.168.10.3"),
                               ("b1", site_b, "192.168.20.2")):
            self.ns[name] = lab.host(name, site.lan, f"{ip}/24", gw=site.lan_ip)
        for node, pods in PODS.items():
            for ip in sorted({p.ip for p in pods}):
                self.ns[node].run("ip", "addr", "add", f"{ip}/32", "dev", "lo")
            etc = f"/etc/netns/{self.ns[node].name}"
            os.makedirs(etc, exist_ok=True)
            with open(os.path.join(etc, "resolv.conf"), "w", encoding="utf-8") as f:
                f.write(RESOLV_CONF)
        for node, pods in NET_PODS.items():
            for pod in pods:
                self.ns[pod.name] = self.pod_netns(node, pod)

    def pod_netns(self, node: str, pod: Pod) -> Netns:
        """A namespace for ``pod`` behind a veth of ``node``: its own Pod IP, which only its
        node routes (the node's side of the veth is the .1 of the Pod's /24)."""
        ns = self.lab.netns(pod.name)
        host = self.ns[node]
        gateway = pod.ip.rsplit(".", 1)[0] + ".1"
        sh("ip", "link", "add", "name", "eth0", "netns", ns.name, "type", "veth", "peer",
           "name", f"veth-{pod.name}", "netns", host.name)
        if f"{gateway}/" not in host.run("ip", "-4", "addr").stdout:
            host.run("ip", "addr", "add", f"{gateway}/24", "dev", f"veth-{pod.name}")
        host.run("ip", "link", "set", f"veth-{pod.name}", "up")
        ns.run("ip", "link", "set", "eth0", "up")
        ns.run("ip", "addr", "add", f"{pod.ip}/24", "dev", "eth0")
        ns.run("ip", "route", "add", "default", "via", gateway)
        return ns

    def spawn(self, where: str, label: str, argv: list[str], env: dict[str, str] | None = None
              ) -> None:
        """Start ``argv`` in namespace ``where``, detached, logging to STATE/logs/LABEL.log."""
        log = open(os.path.join(STATE, "logs", f"{label}.log"), "ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[where].name, *argv], stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})
        log.close()
        with open(os.path.join(STATE, "pids"), "a", encoding="utf-8") as f:
            f.write(f"{proc.pid} {self.ns[where].name} {label}\n")

    def start(self) -> None:
        edgemesh = edgemesh_argv()
        self.spawn("relay", "server", [*edgemesh, "server", "--node-name", "relay",
                                       "--listen", "0.0.0.0:20004",
                                       "--psk-file", self.psk, "--admin", "127.0.0.1:10558",
                                       "--state-dir", os.path.join(STATE, "relay")])
        config = os.path.join(STATE, "agent.yaml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(AGENT_CONFIG)
        for node, pods in NET_PODS.items():
            for pod in pods:
                self.spawn(pod.name, f"pod-{pod.name}", list(pod.argv), env={"NODE_NAME": node})
        for node, pods in PODS.items():
            for pod in pods:
                self.spawn(node, f"pod-{pod.name}", list(pod.argv), env={"NODE_NAME": node})
            self.spawn(node, f"agent-{node}", [
                *edgemesh, "agent", "--config", config, "--node-name", node,
                "--manifests", MANIFESTS,
                "--server", SERVER, "--psk-file", self.psk, "--admin", ADMIN,
                "--state-dir", os.path.join(STATE, node)])
        self.spawn("gateway", "gateway", [
            *edgemesh, "gateway", "--node-name", "gateway", "--manifests", MANIFESTS,
            "--nic", "eth0", "--server", SERVER, "--psk-file", self.psk, "--admin", ADMIN,
            "--state-dir", os.path.join(STATE, "gateway")])

    def wait_ready(self, timeout: float = 90.0) -> None:
        waiting = [*PODS, "gateway"]
        deadline = time.monotonic() + timeout
        for pod in (p for pods in NET_PODS.values() for p in pods):  # python starts slowly
            want = f"{pod.ip}:{pod.argv[-2]}"
            while time.monotonic() < deadline and want not in self.ns[pod.name].run(
                    "ss", "-Hltn", check=False).stdout:
                time.sleep(0.2)
        while waiting and time.monotonic() < deadline:
            waiting = [n for n in waiting if self.ns[n].run(
                "curl", "-sf", "--max-time", "3", f"http://{ADMIN}/readyz",
                check=False).returncode != 0]
            time.sleep(0.3 if waiting else 0)
        if waiting:
            reasons = {n: self.ns[n].run("curl", "-s", "--max-time", "3",
                                         f"http://{ADMIN}/readyz", check=False).stdout.strip()
                       for n in waiting}
            raise SystemExit(f"not ready after {timeout:.0f}s: {reasons}; "
                             f"logs in {STATE}/logs")


def up() -> int:
    if namespaces():
        print("a demo world is already up; tearing it down first")
        down()
    os.makedirs(os.path.join(STATE, "logs"), mode=0o700, exist_ok=True)
    os.chmod(STATE, 0o700)
    world = World()
    with open(world.psk, "w", encoding="utf-8", opener=_private) as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    print(f"building namespaces {PREFIX}-* ...", flush=True)
    try:
        world.build_network()
        world.start()
        print("starting the relay, 4 agents, the gateway and 8 pods ...", flush=True)
        world.wait_ready()
    except BaseException:
        down(quiet=True)
        raise
    tour()
    print(EXPLORE)
    return 0


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


# ---- the tour: real commands, their real output -----------------------------------------------

def show(where: str, command: str, timeout: float = 60.0, retries: int = 0) -> str:
    """Run ``command`` (a shell line, in the repository) in namespace ``where``; print it as a
    user would type it, and its output."""
    name = f"{PREFIX}-{where}"
    shown = f"sh -c {shlex.quote(command)}" if set(command) & set("|&;<>") else command
    print(f"\n$ sudo ip netns exec {name} {shown}", flush=True)
    for attempt in range(retries + 1):
        r = subprocess.run(["ip", "netns", "exec", name, "sh", "-c", command], cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONPATH": ROOT})
        if r.returncode == 0 or attempt == retries:
            break
        time.sleep(1)
    out = (r.stdout + r.stderr).rstrip()
    print(out if out else f"(no output, exit {r.returncode})", flush=True)
    return out


def _command(argv: list[str]) -> str:
    """``argv`` as a shell line, relative to the repository where it lies inside it."""
    return " ".join(shlex.quote(os.path.relpath(a, ROOT) if a.startswith(ROOT + os.sep) else a)
                    for a in argv)


def edgemesh_command() -> str:
    """How a user runs edgemesh here: $EDGEMESH_BIN, the venv's script, or the module."""
    if not os.environ.get("EDGEMESH_BIN") and os.path.exists(os.path.join(ROOT, VENV_EDGEMESH)):
        return VENV_EDGEMESH
    return _command(edgemesh_argv())


def tour() -> None:
    py, em = _command([sys.executable]), edgemesh_command()
    print("\n== DNS: the agent on a1 answers cluster names on 169.254.96.16 ==")
    show("a1", f"dig +noall +answer @{DNS_IP} web.demo.svc.cluster.local")
    print(f"(curl and socat below find it through /etc/netns/{PREFIX}-a1/resolv.conf, which "
          "`ip netns exec` mounts as /etc/resolv.conf)")
    show("a1", "cat /etc/resolv.conf")
    print("\n== HTTP: web has a Pod on a2 (same LAN), b1 (site B) and in the cloud; "
          "round robin ==")
    for _ in range(3):
        show("a1", "curl -sS --max-time 30 http://web.demo/", retries=2)
    print("\n== TCP and UDP echo on b1, behind site B's NAT ==")
    show("a1", 'echo "hello over TCP" | socat -t 10 - TCP:echo.demo:7000', retries=2)
    show("a1", 'echo "hello over UDP" | socat -T 3 - UDP:udp-echo.demo:7001', retries=2)
    print("\n== Edge CNI: a StatefulSet's Pods by their own name and IP, across the NATs ==")
    show("a1", f"dig +short @{DNS_IP} db-0.db.demo.svc.cluster.local")
    show("a1", "curl -sS --max-time 30 http://db-0.db:8080/", retries=2)
    show("a1", "curl -sS --max-time 30 http://10.244.3.10:8080/", retries=2)
    print("\n== WebSocket to the cloud ==")
    show("a1", f"{py} -m examples.demo.wsclient ws://ws.demo/ hi there", retries=2)
    print("\n== The gateway: a client outside the mesh ==")
    for _ in range(2):
        show("outside", f"curl -sS --max-time 30 http://{GATEWAY}/", retries=2)
    print("\n== How a1 reaches each peer (direct on the LAN; punched or relayed across NATs) ==")
    show("a1", f"{em} status")


EXPLORE = f"""
The world keeps running. Explore it (every node's agent admin is on {ADMIN} in its namespace):

  sudo ip netns exec {PREFIX}-a1 curl http://web.demo/
  sudo ip netns exec {PREFIX}-a1 dig @{DNS_IP} echo.demo.svc.cluster.local
  sudo ip netns exec {PREFIX}-b1 curl http://web.demo/
  sudo ip netns exec {PREFIX}-a1 curl http://db-1.db:8080/       # a Pod by name (Edge CNI)
  sudo ip netns exec {PREFIX}-a1 curl http://10.244.2.10:8080/   # a Pod IP behind site B's NAT
  sudo ip netns exec {PREFIX}-outside curl http://{GATEWAY}/
  sudo ip netns exec {PREFIX}-a1 .venv/bin/edgemesh status --json
  sudo ip netns exec {PREFIX}-a1 curl -s {ADMIN}/metrics | grep edgemesh_tunnel
  sudo ip netns exec {PREFIX}-relay curl -s 127.0.0.1:10558/debug/registrations
  sudo .venv/bin/python -m examples.demo.world status
  ls {STATE}/logs/

Tear it all down:  make demo-down   (or: sudo .venv/bin/python -m examples.demo.world down)"""


# ---- status and tearing down ------------------------------------------------------------------

def namespaces() -> list[str]:
    """The demo's namespaces that exist now (found by name, so a fresh process sees them)."""
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.split() and line.split()[0].startswith(f"{PREFIX}-")]


def processes() -> dict[int, str]:
    """pid → label of every recorded process still running in a demo namespace."""
    alive: dict[int, str] = {}
    current = set(namespaces())
    try:
        with open(os.path.join(STATE, "pids"), encoding="utf-8") as f:
            rows = [line.split() for line in f if line.strip()]
    except FileNotFoundError:
        return alive
    for pid, ns, label in rows:
        if ns in current and int(pid) in _pids_in(ns):
            alive[int(pid)] = f"{label} ({ns})"
    return alive


def _pids_in(ns: str) -> set[int]:
    out = sh("ip", "netns", "pids", ns, check=False).stdout
    return {int(p) for p in out.split()}


def status() -> int:
    found = namespaces()
    if not found:
        print("no demo world is up (start one with `make run`)")
        return 1
    print(f"namespaces: {' '.join(sorted(found))}")
    for pid, label in sorted(processes().items(), key=lambda kv: kv[1]):
        print(f"  {pid:>7}  {label}")
    if f"{PREFIX}-a1" in found:
        show("a1", f"{edgemesh_command()} status")
    return 0


def down(quiet: bool = False) -> int:
    """Kill every process inside the demo's namespaces, then delete the namespaces."""
    found = namespaces()
    pids = {pid for ns in found for pid in _pids_in(ns)}
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if os.path.exists(f"/proc/{p}")}
            time.sleep(0.1)
        if not pids:
            break
    for ns in found:
        sh("ip", "netns", "delete", ns, check=False)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
    try:
        os.unlink(os.path.join(STATE, "pids"))
    except FileNotFoundError:
        pass
    if not quiet:
        print(f"removed {len(found)} namespaces; logs kept in {STATE}/logs" if found
              else "no demo world was up")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("up", "down", "status"):
        print(__doc__, file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("the demo builds network namespaces and needs root: "
              f"sudo {sys.executable} -m examples.demo.world {argv[0]}  (or sudo make run)",
              file=sys.stderr)
        return 2
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"the demo needs {', '.join(missing)} (make setup installs them as root)",
              file=sys.stderr)
        return 2
    return {"up": up, "down": down, "status": status}[argv[0]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
