"""Quick proxy-at-scale check (issue 16, item 3): N Services x 5 endpoints in a manifests dir,
one agent (proxy only: DNS and tunnel off) in a fresh network namespace with iptables.

Prints, per N: time to ready, open descriptors, RSS (and its high-water mark), time for one
added Service to be in the rules (``iptables -C``), and time to exit on SIGTERM (and whether
the rules went with it).
The official benchmark is ``bench/scale.py``; this one isolates the proxy.

    sudo .venv/bin/python -m bench.proxy_scale_quick --idle 65 1000 5000 10000
    sudo .venv/bin/python -m bench.proxy_scale_quick --tree /work/main 1000   # another tree
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import yaml

ADMIN = "127.0.0.1:10661"


def service(i: int) -> tuple[dict, dict]:
    ns, name = f"ns{i % 50}", f"svc{i}"
    ip = f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256 or 1}"
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
           "spec": {"clusterIP": ip, "ports": [{"name": "tcp", "port": 80, "targetPort": 8080}]}}
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": f"{name}-1", "namespace": ns,
                        "labels": {"kubernetes.io/service-name": name}},
           "addressType": "IPv4", "ports": [{"name": "tcp", "port": 8080}],
           "endpoints": [{"addresses": [f"172.16.{i % 250}.{k + 1}"], "nodeName": f"n{k}"}
                         for k in range(5)]}
    return svc, eps


def write(mdir: str, n: int) -> None:
    with open(os.path.join(mdir, "all.yaml"), "w") as f:
        yaml.safe_dump_all([doc for i in range(n) for doc in service(i)], f)


def sh(ns: str, *argv: str, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          **kw)  # type: ignore[call-overload]


def ready(ns: str) -> bool:
    r = sh(ns, "curl", "-s", f"http://{ADMIN}/readyz")
    return "[+] proxy ok" in r.stdout


def idle_cpu(pid: int, seconds: float) -> float:
    """Percent of one core the process used over ``seconds``."""
    def ticks() -> int:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    before = ticks()
    time.sleep(seconds)
    return round((ticks() - before) / os.sysconf("SC_CLK_TCK") / seconds * 100, 2)


def run(n: int, tree: str, tmp: str, idle: float = 0.0) -> dict[str, object]:
    ns = f"scale{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    sh(ns, "ip", "link", "set", "lo", "up")
    mdir = os.path.join(tmp, f"m{n}")
    os.makedirs(mdir, exist_ok=True)
    write(mdir, n)
    config = os.path.join(tmp, "config.yaml")
    with open(config, "w") as f:
        json.dump({"modules": {"edgeDNS": {"enable": False}, "edgeTunnel": {"enable": False}},
                   "commonConfig": {"stateDir": os.path.join(tmp, "state")}}, f)
    started = time.monotonic()
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "edgemesh",
                             "agent", "--config", config, "--manifests", mdir, "--node-name",
                             "n0", "--admin", ADMIN], cwd=tree, stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(tmp, f"log{n}"), "w"))
    out: dict[str, object] = {"services": n}
    try:
        while not ready(ns):
            if time.monotonic() - started > 120:
                raise TimeoutError("not ready")
            time.sleep(0.05)
        out["ready_s"] = round(time.monotonic() - started, 2)
        time.sleep(2)
        pid = proc.pid  # ip netns exec execs the agent: same process
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as f:
            status = {line.split(":")[0]: line.split()[1] for line in f if line.startswith("Vm")}
        out["rss_mb"] = round(int(status["VmRSS"]) / 1024, 1)
        out["peak_rss_mb"] = round(int(status["VmHWM"]) / 1024, 1)  # the high-water mark
        if idle:
            out["idle_cpu_pct"] = idle_cpu(pid, idle)
        # one Service more, in a file of its own
        svc, eps = service(n)
        with open(os.path.join(mdir, "new.yaml"), "w") as f:
            yaml.safe_dump_all([svc, eps], f)
        written = time.monotonic()
        ip = svc["spec"]["clusterIP"]
        while "-d " + ip + "/32" not in sh(ns, "iptables", "-t", "nat", "-S",
                                              "EDGEMESH-SERVICES").stdout:
            if time.monotonic() - written > 60:
                raise TimeoutError("change not carried")
            time.sleep(0.02)
        out["change_s"] = round(time.monotonic() - written, 2)
        stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        out["stop_s"] = round(time.monotonic() - stop, 2)
        out["rules_left"] = sh(ns, "iptables-save").stdout.count("EDGEMESH")
        with open(os.path.join(tmp, f"log{n}")) as f:  # "carrying N service ports, ... (T ms)"
            syncs = [line.rsplit("(", 1)[1].split()[0] for line in f if "service ports," in line]
        out["sync_ms_first_change"] = syncs[:1] + syncs[-1:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", ns])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sizes", nargs="+", type=int)
    parser.add_argument("--tree", default=os.getcwd(), help="source tree to run the agent from")
    parser.add_argument("--idle", type=float, default=0.0,
                        help="also measure idle CPU over this many seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            print(json.dumps(run(n, args.tree, tmp, args.idle)), flush=True)


if __name__ == "__main__":
    main()
