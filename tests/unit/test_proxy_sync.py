"""The proxy's sync is driven by what changed (issue 16): a change after a quiet spell is
synced at once (no fixed debounce), a burst of changes shares a few syncs, and a sync redoes
only the ports of the Services the change touched. Counted, never timed in absolute terms.
"""
from __future__ import annotations

import time

import gevent
import pytest

from edgemesh import agent
from edgemesh.config import Config
from edgemesh.meta import models
from edgemesh.meta.store import Store
from edgemesh.proxy import iptables
from edgemesh.proxy.module import WATCHED, PortKey, ProxyModule
from edgemesh.proxy.steering import Steering
from edgemesh.proxy.tcp import TCPProxy
from edgemesh.runtime import tasks


def _quiet(rec: tasks.Reconciler, runs: list[int], n: int) -> None:
    """Wait until ``n`` runs happened and the reconciler's min_interval has passed since."""
    while len(runs) < n:
        gevent.sleep(0.005)
    gevent.sleep(0.06)


def test_one_change_after_a_quiet_spell_runs_at_once() -> None:
    runs: list[int] = []
    rec = tasks.Reconciler("test-at-once", lambda: runs.append(1), min_interval=0.05)
    rec.start()
    try:
        _quiet(rec, runs, 1)
        rec.wake()
        for _ in range(3):  # a few switches, no timer: a fixed delay would not have run yet
            gevent.sleep(0)
        assert len(runs) == 2
    finally:
        rec.stop()


def test_a_fixed_delay_does_not_run_at_once() -> None:
    """The control for the test above: the old debounce (``delay``) waits its time."""
    runs: list[int] = []
    rec = tasks.Reconciler("test-delay", lambda: runs.append(1), delay=0.05)
    rec.start()
    try:
        _quiet(rec, runs, 1)
        rec.wake()
        for _ in range(3):
            gevent.sleep(0)
        assert len(runs) == 1
    finally:
        rec.stop()


def test_a_burst_of_1000_changes_shares_a_few_runs() -> None:
    seen: list[int] = []
    state = {"value": 0}
    rec = tasks.Reconciler("test-burst", lambda: seen.append(state["value"]),
                           min_interval=0.05)
    rec.start()
    try:
        _quiet(rec, seen, 1)
        started = time.monotonic()
        for i in range(1, 1001):  # each change yields, as a watch stream's events do
            state["value"] = i
            rec.wake()
            gevent.sleep(0)
        elapsed = time.monotonic() - started
        while seen[-1] != 1000:
            gevent.sleep(0.01)
        runs = len(seen) - 1
        # at most one run at the burst's start and one per min_interval after it
        assert 1 <= runs <= 2 + elapsed / 0.05, (runs, elapsed)
        assert runs < 100
    finally:
        rec.stop()


# ---- the proxy module: a change redoes its own ports and rules only ---------------------------

N = 5000


def _svc(i: int, ip: str = "", node_port: int = 0) -> dict:
    port = {"name": "http", "port": 80, "targetPort": 8080}
    spec: dict = {"clusterIP": ip or f"10.96.{i // 250}.{i % 250 + 1}", "ports": [port]}
    if node_port:
        spec["type"], port["nodePort"] = "NodePort", node_port
    return {"metadata": {"name": f"s{i}", "namespace": f"ns{i % 50}"}, "spec": spec}


def _slice(i: int, base: int = 160) -> dict:
    return {"metadata": {"name": f"s{i}-0", "namespace": f"ns{i % 50}",
                         "labels": {"kubernetes.io/service-name": f"s{i}"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [f"10.{base}.{i // 250}.{k}"]} for k in range(1, 4)]}


class _Rules(iptables.Rules):
    """The real rule bookkeeping; what would be applied is kept instead of applied."""

    def __init__(self) -> None:
        super().__init__("iptables-test")
        self.texts: list[str] = []

    def _apply(self, texts: list[str], started: float) -> None:
        self.texts.append("".join(texts))
        self.batches = texts
        self.operations = sum(1 for text in texts for line in text.splitlines()
                              if line[:2] in ("-A", "-D", "-I"))

    def check(self) -> bool:
        return True


class _Transparent:
    def __init__(self) -> None:
        self.steering: Steering = Steering()
        self.address = ("169.254.96.16", 40000)


@pytest.fixture
def proxy(monkeypatch):
    """A proxy module over 5,000 Services as with iptables (rules recorded, not applied)."""
    monkeypatch.setattr(iptables, "_save_tables", lambda binary: {t: "" for t in iptables.TABLES})
    store = Store()
    store.replace_many({"Service": [(models.parse_service(_svc(i)), None) for i in range(N)],
                        "EndpointSlice": [(models.parse_endpoint_slice(_slice(i)), None)
                                          for i in range(N)]})
    store.mark_synced()
    admin = type("Admin", (), {"add_check": lambda *a: None, "add_view": lambda *a: None})()
    m = ProxyModule(agent.Context(config=Config(nodeName="n0"), store=store, admin=admin))
    m.tcp = TCPProxy(m.dialer, 5, 60, 100)
    m.transparent[4] = _Transparent()  # type: ignore[assignment]
    m.rules = _Rules()
    built: list[str] = []
    real = m._listener_for
    monkeypatch.setattr(m, "_listener_for", lambda key, svc, port: (
        built.append(str(key)), real(key, svc, port))[1])
    m.sync()
    assert len(m.listeners) == N and len(built) == N
    built.clear()
    return m, store, built


def _full(m: ProxyModule) -> iptables.Ruleset:
    """The rules a whole sync would write for the module's current ports."""
    return iptables.ruleset([p for _, mine in m._seen.values() for p in mine])


def test_one_changed_service_of_5000_redoes_its_port_and_two_rules(proxy) -> None:
    m, store, built = proxy
    rules = m.rules
    assert isinstance(rules, _Rules)
    store.upsert("Service", models.parse_service(_svc(7, ip="10.111.1.1")), None)
    m._wake()
    m.sync()
    assert built == ["ns7/s7:80/tcp"] and rules.operations == 2
    # the new rule in a first transaction, the old one's removal after it
    assert [t.splitlines()[1].split()[:3] for t in rules.batches] == [
        ["-I", "EDGEMESH-SERVICES", "1"], ["-D", "EDGEMESH-SERVICES", "-d"]]
    assert "-d 10.111.1.1/32" in rules.batches[0] and "-d 10.96.0.8/32" in rules.batches[1]
    assert m.transparent[4].steering.lookup("10.111.1.1", 80) is m.listeners[
        PortKey("ns7", "s7", 80, "tcp")]
    assert m.transparent[4].steering.lookup("10.96.0.8", 80) is None
    assert rules.applied is not None and rules.applied.sets == _full(m).sets


def test_one_changed_endpoint_slice_writes_no_rule(proxy) -> None:
    m, store, built = proxy
    rules = m.rules
    texts = len(rules.texts)
    store.upsert("EndpointSlice", models.parse_endpoint_slice(_slice(9, base=170)), None)
    m._wake()
    m.sync()
    assert built == ["ns9/s9:80/tcp"] and len(rules.texts) == texts  # nothing to apply
    assert [b.ip for b in m.listeners[PortKey("ns9", "s9", 80, "tcp")].backends][0] \
        == "10.170.0.1"


def test_added_and_deleted_services_and_a_first_node_port(proxy) -> None:
    m, store, built = proxy
    rules = m.rules
    store.upsert("Service", models.parse_service(_svc(N, ip="10.111.2.2")), None)
    store.delete("Service", "ns3", "s3")
    m._wake()
    m.sync()
    assert built == [f"ns0/s{N}:80/tcp"] and rules.operations == 2
    assert PortKey("ns3", "s3", 80, "tcp") not in m.listeners
    # the first NodePort adds a jump (the ordered part): the chains are rewritten whole
    store.upsert("Service", models.parse_service(_svc(11, node_port=30080)), None)
    m._wake()
    m.sync()
    assert rules.texts[-1].startswith("*nat\n:EDGEMESH-SERVICES")
    assert rules.applied is not None and rules.applied.sets == _full(m).sets
    assert rules.applied.ordered == _full(m).ordered
    store.upsert("Service", models.parse_service(_svc(12, node_port=30081)), None)
    m._wake()
    m.sync()
    # a second NodePort: its one rule (the ClusterIP's stays as it was)
    assert rules.operations == 1 and rules.applied.sets == _full(m).sets


def test_a_burst_of_1000_store_changes_shares_a_few_syncs(proxy) -> None:
    m, store, built = proxy
    store.subscribe(m._wake, WATCHED)
    m.reconciler.start()
    deadline = time.monotonic() + 120  # a bound for a hang, not a measurement
    try:
        while m.reconciler.runs < 1:
            gevent.sleep(0.01)
        gevent.sleep(0.06)
        before = m.reconciler.runs
        started = time.monotonic()
        for i in range(1000):
            store.upsert("EndpointSlice", models.parse_endpoint_slice(_slice(i, base=171)),
                         None)
            gevent.sleep(0)
        elapsed = time.monotonic() - started
        while (len(built) < 1000 or m._synced_changes != m._changes) \
                and time.monotonic() < deadline:
            gevent.sleep(0.01)
        syncs = m.reconciler.runs - before
        assert syncs <= 2 + elapsed / 0.05 and syncs < 100, (syncs, elapsed)
        assert sorted(built) == sorted(f"ns{i % 50}/s{i}:80/tcp" for i in range(1000))
    finally:
        m.reconciler.stop()
