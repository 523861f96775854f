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
