"""Relay abuse (issue 18) against a real ``edgemesh server``: a valid member flooding circuit
requests is held to its per-member cap, a second one meets the relay-wide cap (both refused
and counted by reason), and another member streaming flat out through the relay; meanwhile a
good member's round trips through the relay are compared with its own calm ones.

The lab is test_tunnel.py's (two NATed sites, relayed paths, agents a1, a2, b1), with the
server restarted on small caps; the flooders are scripts holding the cluster PSK on the
"internet" that open circuits the way an agent does (``Peers._open_circuit``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from bench.tunnel import rtt_us
from tests import netlab
from tests.e2e import meshlab
from tests.e2e import test_tunnel as tt
from tests.e2e.meshlab import metric
from tests.procs import ROOT

pytestmark = pytest.mark.netns

PER_MEMBER, TOTAL = 4, 7
RATE = 20_000_000
ECHO_B = "10.96.1.2"  # socat cat on b1, through the relay from a1

# argv: root name psk state server target attempts hold-seconds. Opens ``attempts`` circuits at
# once, keeps the accepted ones open for ``hold`` s; prints {"ok": n, "refused": {reason: n}}.
FLOOD = textwrap.dedent("""
    import sys; sys.path.insert(0, sys.argv[1])
    from gevent import monkey; monkey.patch_all()
    import collections, json, time
    import gevent
    from edgemesh.tunnel import control, identity
    from edgemesh.tunnel import frames as fr
    from edgemesh.tunnel.node import TunnelNode
    from edgemesh.tunnel.records import SecureChannel
    from edgemesh.tunnel.session import read_record
    name, psk, state, server, target = sys.argv[2:7]
    attempts, hold = int(sys.argv[7]), float(sys.argv[8])
    node = TunnelNode(name, "agent", state, identity.load_psk(psk), "bindings.json")
    host, port = server.rsplit(":", 1)
    held, refused = [], collections.Counter()
    def one():
        sock = node.dial(host, int(port), 10, shared_port=False)
        try:
            result, reader = node.authenticate(sock, node.hello("circuit", connect=target),
                                               None, 10)
            channel = SecureChannel(result.send, result.recv)
            body = read_record(sock, reader, time.monotonic() + 15)
            answer = control.decode(fr.decode_frame(channel.open(body)).payload)
        except Exception as e:
            refused[type(e).__name__] += 1
            sock.close()
            return
        if answer.ok:
            held.append(sock)
        else:
            refused[answer.reason.split(":")[0]] += 1
            sock.close()
    gevent.joinall([gevent.spawn(one) for _ in range(attempts)])
    print(json.dumps({"ok": len(held), "refused": dict(refused)}), flush=True)
    time.sleep(hold)
""")


@pytest.fixture(scope="module")
def relay_env(module_lab):
    lab, tmp = module_lab
    env = tt.Env(lab, tmp)
    env.server.stop()
    config = meshlab.write(tmp, "server-caps.yaml", yaml.safe_dump(
        {"kind": "EdgeMeshServer",
         "server": {"relayBytesPerSecond": RATE, "relayMaxCircuits": PER_MEMBER,
                    "relayMaxCircuitsTotal": TOTAL}}))
    env.server = meshlab.server(env.srv, tmp, env.psk, tt.SERVER_ADMIN, config)
    inet = netlab.Switch(next(n for n in lab.namespaces if n.name.endswith("-inet")), ports=20)
    env.flooders = {n: lab.host(n, inet, f"198.18.0.{20 + i}/24")
                    for i, n in enumerate(("evil", "evil2"))}
    for node in ("a1", "a2"):  # both relayed to b1 again through the restarted server
        netlab.wait_for(lambda node=node: env.run(node, "python3", "-c", meshlab.TCP_CLIENT,
                                                  ECHO_B, "80").strip() == "ping over the tunnel",
                        60, 1.0, what=f"{node} through the new relay")
    yield env
    for p in [*env.procs.values(), env.server]:
        p.stop()


# argv: root name psk state server. A member that registers and accepts every circuit offered
# to it, then sends nothing on it; prints one line per accepted circuit, and "closed" (with
# the seconds it was held) when the relay ends it.
PARKER = textwrap.dedent("""
    import sys; sys.path.insert(0, sys.argv[1])
    from gevent import monkey; monkey.patch_all()
    import time
    import gevent
    from edgemesh.tunnel import control, identity
    from edgemesh.tunnel import frames as fr
    from edgemesh.tunnel.node import TunnelNode
    from edgemesh.tunnel.records import SecureChannel
    from edgemesh.tunnel.session import Session, read_record
    name, psk, state, server = sys.argv[2:6]
    node = TunnelNode(name, "agent", state, identity.load_psk(psk), "bindings.json")
    host, port = server.rsplit(":", 1)
    def park(token):
        sock = node.dial(host, int(port), 10, shared_port=False)
        result, reader = node.authenticate(sock, node.hello("circuit", accept=token), None, 10)
        body = read_record(sock, reader, time.monotonic() + 10)
        channel = SecureChannel(result.send, result.recv)
        ok = control.decode(fr.decode_frame(channel.open(body)).payload).ok
        print("accepted" if ok else "refused", flush=True)
        t = time.monotonic()
        sock.settimeout(None)
        while sock.recv(65536):
            pass
        print("closed %.1f" % (time.monotonic() - t), flush=True)
    def on_control(session, msg):
        if isinstance(msg, control.Incoming):
            gevent.spawn(park, msg.circuit)
            return True
        return isinstance(msg, control.Registered)
    sock = node.dial(host, int(port), 10, shared_port=False)
    result, reader = node.authenticate(sock, node.hello(), None, 10)
    session = Session(sock, result, reader, initiator=True, local_hello=node.hello(),
                      path="direct", address=server, on_control=on_control)
    session.start()
    session.send_control(control.Register((), 0))
    print("registered", flush=True)
    gevent.sleep(120)
""")


def _server_metric(env, name: str, **labels: str) -> float:
    return metric(env.metrics(env.srv, tt.SERVER_ADMIN), name, **labels)


def _flood(env, who: str, attempts: int, hold: float) -> subprocess.Popen[bytes]:
    state = os.path.join(env.tmp, f"state-{who}")
    os.makedirs(state, exist_ok=True)
    return env.flooders[who].popen([sys.executable, "-c", FLOOD, ROOT, who, env.psk, state,
                                    tt.SERVER, "b1", str(attempts), str(hold)],
                                   stdout=subprocess.PIPE)


def test_a_circuit_flood_meets_the_member_and_relay_caps_a_good_member_carries_on(
        relay_env) -> None:
    env = relay_env
    calm = rtt_us(env.ns["a1"], ECHO_B, 80, 300)
    before = {r: _server_metric(env, "edgemesh_relay_circuits_total", result=r)
              for r in ("circuit_limit", "relay_full")}
    evil = _flood(env, "evil", 30, 20)
    assert evil.stdout is not None
    got = json.loads(evil.stdout.readline())
    assert got["ok"] == PER_MEMBER and got["refused"] == {"circuit limit": 30 - PER_MEMBER}, got
    busy = rtt_us(env.ns["a1"], ECHO_B, 80, 300)
    # a second member: what is left of the relay-wide cap (a1, a2 and evil hold 2 + 4)
    evil2 = _flood(env, "evil2", PER_MEMBER, 1)
    got2 = json.loads(evil2.communicate(timeout=60)[0])
    assert got2["ok"] == TOTAL - 2 - PER_MEMBER, got2
    assert got2["refused"] == {"relay full": PER_MEMBER - got2["ok"]}, got2
    after = {r: _server_metric(env, "edgemesh_relay_circuits_total", result=r)
             for r in ("circuit_limit", "relay_full")}
    assert after["circuit_limit"] - before["circuit_limit"] == 30 - PER_MEMBER
    assert after["relay_full"] - before["relay_full"] == PER_MEMBER - got2["ok"]
    evil.kill()
    evil.wait()
    netlab.wait_for(lambda: _server_metric(env, "edgemesh_relay_circuits", peer="evil") == 0,
                    30, 0.5, what="evil's circuits freed")
    print(f"circuit flood: a1 round trip {calm:.0f} us calm, {busy:.0f} us with the relay "
          f"at its caps (x{busy / calm:.2f})")
    assert busy / calm < 3


def test_one_member_streaming_flat_out_does_not_starve_another(relay_env) -> None:
    env = relay_env
    calm = rtt_us(env.ns["a1"], ECHO_B, 80, 300)
    bulk = env.ns["a2"].popen(["sh", "-c", "for i in 1 2 3; do curl -sS --max-time 60 "
                               "http://10.96.1.1/big.bin | wc -c; done"], stdout=subprocess.PIPE)
    netlab.wait_for(lambda: _server_metric(env, "edgemesh_relay_throttled_seconds_total",
                                           peer="b1") > 0, 30, 0.2,
                    what="b1's relay bucket at its limit")
    busy = rtt_us(env.ns["a1"], ECHO_B, 80, 300)
    still = bulk.poll() is None
    out = bulk.communicate(timeout=90)[0]
    print(f"flat out: a1 round trip {calm:.0f} us calm, {busy:.0f} us while a2 pulls "
          f"3 x 100 MB from b1 at the relay's {RATE // 1_000_000} MB/s per member "
          f"(x{busy / calm:.2f}); bulk still running at the end: {still}")
    assert [int(n) for n in out.split()] == [tt.BIG] * 3
    assert still  # the round trips were measured while the bulk transfer ran
    assert busy / calm < 5, (calm, busy)


def test_idle_circuits_parked_by_two_members_are_closed_after_the_idle_timeout(
        relay_env) -> None:
    """Two colluding members park circuits between them that carry nothing: a relay (its own
    server here, relayIdleTimeout 2 s) closes them and counts them."""
    env = relay_env
    srv2 = env.flooders["evil"]  # a second relay, on the flooders' host, idle timeout 2 s
    config = meshlab.write(env.tmp, "server-idle.yaml", yaml.safe_dump(
        {"kind": "EdgeMeshServer", "server": {"relayIdleTimeout": 2.0}}))
    own = os.path.join(env.tmp, "idle-relay")  # its own state (key, bindings)
    os.makedirs(own, exist_ok=True)
    idle_server = meshlab.server(srv2, own, env.psk, "127.0.0.1:10590", config, port=20014)
    try:
        srv2.wait_listening("0.0.0.0:20014")
        state = os.path.join(env.tmp, "state-parker")
        os.makedirs(state, exist_ok=True)
        parker = env.flooders["evil2"].popen(
            [sys.executable, "-c", PARKER, ROOT, "parker", env.psk, state, "198.18.0.20:20014"],
            stdout=subprocess.PIPE)
        assert parker.stdout is not None and parker.stdout.readline().strip() == b"registered"
        flood_state = os.path.join(env.tmp, "state-idler")
        os.makedirs(flood_state, exist_ok=True)
        idler = srv2.popen([sys.executable, "-c", FLOOD, ROOT, "idler", env.psk, flood_state,
                            "198.18.0.20:20014", "parker", "3", "30"], stdout=subprocess.PIPE)
        assert idler.stdout is not None
        got = json.loads(idler.stdout.readline())
        assert got == {"ok": 3, "refused": {}}, got
        lines = [parker.stdout.readline().decode().split() for _ in range(6)]
        closed = sorted(float(words[1]) for words in lines if words[0] == "closed")
        idler.kill()
        parker.kill()
        text = srv2.run("curl", "-s", "http://127.0.0.1:10590/metrics").stdout
        print(f"parked circuits closed after {closed} s (relayIdleTimeout 2 s)")
        assert len(closed) == 3 and all(2.0 <= t < 6.0 for t in closed), lines
        assert metric(text, "edgemesh_relay_idle_circuits_closed_total") == 3
        assert metric(text, "edgemesh_relay_circuits", peer="idler") == 0
    finally:
        idle_server.stop()
