"""Faults injected while real clients on a1 run traffic (tests/chaos/traffic.py) through the
chaos lab (tests/chaos/lab.py); each fault's figures become one row of the session's table.

``EDGEMESH_CHAOS=long`` (``make chaos``) repeats each fault, kills the agent 100 times and keeps
the API down for a minute; the default short version does each once (kill -9 five times, API
down 10 s) and belongs to ``make test``.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests import netlab
from tests.chaos import lab as chaoslab
from tests.chaos.lab import FLOWS, RELAYED, SERVICES, ChaosLab
from tests.chaos.report import ROWS, Row
from tests.chaos.trial import Trial, check, wait_flowing

pytestmark = [pytest.mark.chaos, pytest.mark.netns]

LONG = os.environ.get("EDGEMESH_CHAOS", "short") == "long"
REPEAT = 3 if LONG else 1
KILLS = 100 if LONG else 5
API_DOWN = 60.0 if LONG else 10.0
HOLD = 20.0 if LONG else 5.0  # how long a server stays dead, a link bad, a clock an hour off
SITE_A_WAN = (*RELAYED, "http-cloud")  # flows that cross site A's router and WAN link


def row(fault: str, bound: float) -> Row:
    r = Row(fault=fault, bound_s=bound)
    ROWS.append(r)
    return r


def test_relay_server_killed_and_restarted(chaos: ChaosLab) -> None:
    r = row("relay server kill -9, restarted at once", 30)
    for _ in range(REPEAT):
        with Trial(chaos, r, RELAYED):
            chaos.server.stop(signal.SIGKILL)
            chaos.server = chaos.start_server()
    check(r, RELAYED)


def test_all_servers_down_direct_paths_carry_on(chaos: ChaosLab) -> None:
    r = row(f"all servers down {HOLD:g} s (direct paths)", 30)
    for _ in range(REPEAT):
        with Trial(chaos, r, RELAYED) as t:
            chaos.server.stop(signal.SIGKILL)
            time.sleep(HOLD)
            chaos.server = chaos.start_server()
            t.restored()
    check(r, RELAYED)


def test_nat_mapping_flushed(chaos: ChaosLab) -> None:
    """Every connection through site A's NAT loses its mapping; the agents' watches on the API
    must notice too: a Service added after the flush reaches a1 (it took 5-10 min, the watch
    timeout, before the API connections kept alive)."""
    r = row("site A NAT: conntrack -F (random-fully)", 40)
    for _ in range(REPEAT):
        try:
            with Trial(chaos, r, SITE_A_WAN):
                chaos.routers["a"].router.run("conntrack", "-F", check=False)
                time.sleep(1)
                add_late(chaos)
                start = time.monotonic()
                wait_late(chaos, r.bound_s, "a1 serving a Service added after the NAT flush")
                r.note += f" change seen after {time.monotonic() - start:.1f} s;"
                remove_late(chaos)
                netlab.wait_for(lambda: curl(chaos, "10.96.3.8") != "hello from a2", 30, 0.25,
                                what="the Service deleted again")
        finally:
            remove_late(chaos)
    check(r, SITE_A_WAN)


def test_an_endpoint_pod_killed_retries_move_on(chaos: ChaosLab) -> None:
    r = row("endpoint pod killed (web-b on b1; b2 remains)", 10)
    for _ in range(REPEAT):
        with Trial(chaos, r, ()) as t:
            pod = chaos.pods["b1/http"]
            pod.kill()
            pod.wait()
            time.sleep(HOLD)
            chaos.start_pod("b1", "http", pod.args[4:])  # after "ip netns exec NS"
            chaos.ns["b1"].wait_listening(f"{chaoslab.POD}:8000")
            t.restored()
    check(r, ())


def test_a_link_with_delay_and_loss(chaos: ChaosLab) -> None:
    r = row(f"site A WAN 300 ms delay, 5 % loss, {HOLD:g} s", 20)
    for _ in range(REPEAT):
        with Trial(chaos, r, SITE_A_WAN) as t:
            chaos.impair(0.3, 0.05)
            time.sleep(HOLD)
            chaos.impair(0, 0)
            t.restored()
    check(r, SITE_A_WAN)


def test_the_clock_of_a_node_stepped_by_an_hour(chaos: ChaosLab) -> None:
    r = row(f"a1 clock +1 h for {HOLD:g} s, then back", 10)
    r.note = ("a1's CLOCK_REALTIME stepped with libfaketime (a time namespace cannot offset "
              "it), monotonic untouched; a Service added and removed across the steps;")
    for _ in range(REPEAT):
        try:
            with Trial(chaos, r, ()) as t:
                meta_write(chaos.clock_file, "+3600\n")
                start = time.monotonic()
                time.sleep(2)  # libfaketime rereads the file once a second
                add_late(chaos)  # a change handled on the stepped clock; its cache says when
                wait_late(chaos, 30, "a1 serving a Service added while its clock is stepped")
                ahead = cache_written(chaos) - time.time()
                assert ahead > 3000, f"a1's clock was not stepped ({ahead:.0f} s ahead)"
                time.sleep(max(0.0, HOLD - (time.monotonic() - start)))
                meta_write(chaos.clock_file, "+0\n")
                remove_late(chaos)  # and back on the true clock
                netlab.wait_for(lambda: curl(chaos, "10.96.3.8") != "hello from a2", 30, 0.25,
                                what="the Service deleted again")
                t.restored()
        finally:
            meta_write(chaos.clock_file, "+0\n")
            remove_late(chaos)
    check(r, ())


def test_api_server_down_agents_serve_the_cache_then_catch_up(chaos: ChaosLab) -> None:
    r = row(f"API server down {API_DOWN:g} s, changed meanwhile", 40)
    for _ in range(REPEAT):
        try:
            with Trial(chaos, r, ()) as t:
                chaos.api.stop()
                time.sleep(API_DOWN / 2)
                add_late(chaos)
                time.sleep(API_DOWN / 2)
                chaos.api.start()
                t.restored()
                wait_late(chaos, r.bound_s, "a1 serving the Service added while the API was away")
                r.note += f" caught up in {time.monotonic() - t.t_restore:.1f} s;"
                remove_late(chaos)  # its rules must go too: compared when the trial ends
                netlab.wait_for(lambda: curl(chaos, "10.96.3.8") != "hello from a2", 30, 0.25,
                                what="the Service deleted again")
        finally:
            if chaos.api._server is None:  # the fault ended in an error: the API returns
                chaos.api.start()
            remove_late(chaos)
    check(r, ())


def test_agent_kill_9_and_restart_under_traffic(chaos: ChaosLab) -> None:
    r = row(f"agent a1 kill -9 + restart x{KILLS}", 30)
    before_rules = chaos.snapshot("a1").rules
    with Trial(chaos, r, FLOWS) as t:
        for i in range(KILLS):
            start = time.monotonic()
            chaos.restart_agent("a1", signal.SIGKILL)
            if i < KILLS - 1:  # the last run is timed by the Trial itself
                done = wait_flowing(chaos, start, r.bound_s + 30)
                r.recovery_s.append(round(done - start, 2))
            rules = chaos.snapshot("a1")
            assert not rules.duplicates(), f"kill {i}: duplicate rules {rules.duplicates()}"
            assert set(rules.rules) == set(before_rules), f"kill {i}: rules changed"
            assert cached_services(chaos) >= {s["metadata"]["name"] for s, _ in SERVICES}
            t.t_restore = start
    r.runs = KILLS
    check(r, FLOWS)


def add_late(chaos: ChaosLab) -> None:
    """Service "late" (10.96.3.8) with a2's web Pod, added while the agents run."""
    svc, eps = chaoslab.service("late", "10.96.3.8", 80, 8000, ["a2"], port_name="http")
    chaos.api.put("services", svc)
    chaos.api.put("endpointslices", eps)


def wait_late(chaos: ChaosLab, timeout: float, what: str) -> None:
    try:
        netlab.wait_for(lambda: curl(chaos, "10.96.3.8") == "hello from a2", timeout, 0.25,
                        what=what)
    except TimeoutError as e:
        raise AssertionError(f"{e}\n--- a1 ---\n{chaos.agents['a1'].log()[-3000:]}") from None


def remove_late(chaos: ChaosLab) -> None:
    for resource, name in (("services", "late"), ("endpointslices", "late-1")):
        if ("default", name) in chaos.api.objects[resource]:
            chaos.api.delete(resource, "default", name)


def curl(chaos: ChaosLab, ip: str) -> str:
    return chaos.ns["a1"].run("curl", "-s", "--max-time", "3", f"http://{ip}/",
                              check=False).stdout


def cached_services(chaos: ChaosLab) -> set[str]:
    with open(os.path.join(chaos.state_dir("a1"), "metadata-cache.json")) as f:
        return {d["metadata"]["name"] for d in json.load(f)["kinds"]["Service"]}


def cache_written(chaos: ChaosLab) -> float:
    """When a1 last wrote its metadata cache, by its own clock (epoch seconds)."""
    import calendar

    path = os.path.join(chaos.state_dir("a1"), "metadata-cache.json")

    def written() -> float:
        with open(path) as f:
            stamp = json.load(f)["written"]
        return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    return netlab.wait_for(lambda: written() > time.time() + 60 and written(), 10, 0.2,
                           what="a1's cache written by the stepped clock") or 0.0


def meta_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)

