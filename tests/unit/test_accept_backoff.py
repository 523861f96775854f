"""Accepting with descriptors exhausted: the listener pauses instead of spinning, and serves
again once descriptors are back (gevent's StreamServer backoff, review §5.5)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from edgemesh.runtime.backoff import AcceptBackoff

CHILD = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import json, os, resource, socket, time
    import gevent
    from edgemesh.meta.store import Backend
    from edgemesh.dialer import Dialer
    from edgemesh.proxy.lb import Balancer, LBSpec
    from edgemesh.proxy.tcp import ACCEPT_PAUSES, TCPListener, TCPProxy

    echo = socket.socket(); echo.bind(("127.0.0.1", 0)); echo.listen(64)
    def handle(c):
        with c:
            while data := c.recv(65536):
                c.sendall(data)
    def serve():
        while True:
            try:
                gevent.spawn(handle, echo.accept()[0])
            except OSError:  # EMFILE while the filler holds every descriptor
                gevent.sleep(0.05)
    gevent.spawn(serve)
    proxy = TCPProxy(Dialer("n1", connect_timeout=1.0), connect_timeout=1.0,
                     idle_timeout=60.0, max_connections=100)
    lst = TCPListener(proxy, "t/fds", "127.0.0.1", Balancer(LBSpec()),
                      [Backend("127.0.0.1", echo.getsockname()[1], "n1")])
    clients = [socket.socket() for _ in range(5)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    filler = []
    while True:
        try:
            filler.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            break
    for c in clients:  # queued in the listener's backlog: accept() meets EMFILE
        c.connect(lst.address)
    gevent.sleep(0.05)
    cpu0, wall0 = time.process_time(), time.monotonic()
    gevent.sleep(2.0)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    for fd in filler:
        os.close(fd)
    clients[0].settimeout(5.0)
    t0 = time.monotonic()
    clients[0].sendall(b"back")
    echoed = clients[0].recv(16)
    print(json.dumps({"cpu": cpu, "wall": wall, "echoed": echoed.decode(),
                      "resumed_after": time.monotonic() - t0,
                      "pauses": ACCEPT_PAUSES.labels("t/fds").value}))
""")


def test_backoff_doubles_to_the_cap_and_resets() -> None:
    b = AcceptBackoff(0.01, 1.0)
    delays = [b.delay() for _ in range(9)]
    assert delays[:3] == [0.01, 0.02, 0.04] and delays[-2:] == [1.0, 1.0]
    b.reset()
    assert b.delay() == 0.01


def test_exhausted_descriptors_cost_no_cpu_and_service_resumes() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=25)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # a spinning watcher burns most of the wall time (1.51 s of 2 s measured); paused ~0
    assert got["cpu"] < 0.05 * got["wall"], got
    assert got["pauses"] >= 3, got
    assert got["echoed"] == "back", got
