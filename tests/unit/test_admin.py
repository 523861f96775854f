"""The admin endpoint: /livez, /readyz, /metrics (Prometheus text), /debug views."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest

from edgemesh import __version__, agent
from edgemesh.config import Config
from edgemesh.context import Context
from edgemesh.meta import models
from edgemesh.meta.store import Store
from edgemesh.runtime import lifecycle, metrics
from edgemesh.runtime.admin import Admin
from tests.procs import http_get

SAMPLE = re.compile(r'^[a-z_][a-z0-9_]*(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? '
                    r'(-?[0-9.e+-]+|[+-]Inf|NaN)$')


@pytest.fixture
def admin():
    a = Admin()
    host, port = a.start("127.0.0.1:0")
    yield a, f"{host}:{port}"
    a.stop()


def test_livez_and_method_and_unknown_paths(admin):
    _, addr = admin
    assert http_get(f"http://{addr}/livez") == (200, "ok\n")
    assert http_get(f"http://{addr}/nope")[0] == 404
    request = urllib.request.Request(f"http://{addr}/livez", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=3)
    assert e.value.code == 405


def test_readyz_lists_what_is_not_ready(admin):
    a, addr = admin
    state = {"metadata": "waiting for first sync"}
    a.add_check("metadata", lambda: state["metadata"])
    a.add_check("dns", lambda: "")
    a.add_check("broken", lambda: 1 / 0)
    status, body = http_get(f"http://{addr}/readyz")
    assert status == 503
    assert body == ("[-] broken: check failed: division by zero\n"
                    "[-] metadata: waiting for first sync\n")
    a.remove_check("broken")
    state["metadata"] = ""
    assert http_get(f"http://{addr}/readyz") == (200, "[+] dns ok\n[+] metadata ok\nok\n")


def test_debug_views_are_json(admin):
    a, addr = admin
    a.add_view("things", lambda: {"b": [1, 2], "a": None})
    a.add_view("broken", lambda: {}["missing"])
    assert json.loads(http_get(f"http://{addr}/debug/")[1]) == ["broken", "things"]
    assert json.loads(http_get(f"http://{addr}/debug/things")[1]) == {"a": None, "b": [1, 2]}
    status, body = http_get(f"http://{addr}/debug/broken")
    assert status == 500 and "view failed" in body
    assert http_get(f"http://{addr}/debug/nothing")[0] == 404
    assert http_get(f"http://{addr}/livez")[0] == 200  # still serving


def test_metrics_of_a_node(admin):
    a, addr = admin
    store = Store()
    ctx = Context(config=Config(nodeName="edge-node-1"), store=store, admin=a)
    lifecycle.BUILD_INFO.labels(__version__, "agent").set(1)
    agent._register_views(ctx)
    raw = {"metadata": {"name": "web", "namespace": "demo"},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}}
    store.replace("Service", [(models.parse_service(raw), raw)])
    status, text = http_get(f"http://{addr}/metrics")
    assert status == 200
    assert f'edgemesh_build_info{{version="{__version__}",role="agent"}} 1' in text.splitlines()
    assert 'edgemesh_store_objects{kind="Service"} 1' in text.splitlines()
    assert 'edgemesh_store_objects{kind="Pod"} 0' in text.splitlines()
    assert "# TYPE edgemesh_store_objects gauge" in text
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or SAMPLE.match(line), \
            line
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert names == sorted(names) and len(names) == len(set(names))
    assert all(n.startswith("edgemesh_") for n in names)
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=3) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    view = json.loads(http_get(f"http://{addr}/debug/node")[1])
    assert view["node"] == "edge-node-1" and view["synced"] is False
    assert http_get(f"http://{addr}/readyz")[0] == 503
    store.mark_synced()
    assert http_get(f"http://{addr}/readyz")[0] == 200


def test_counter_gauge_histogram_text_format():
    reg = metrics.Registry()
    c = reg.register(metrics.Counter("edgemesh_test_requests_total", "Requests.", ["code"]))
    c.labels("200").inc()
    c.labels("200").inc(2)
    c.labels('we"ird\\').inc()
    g = reg.register(metrics.Gauge("edgemesh_test_open", "Open.\nSecond line"))
    g.set(3)
    g.dec(0.5)
    h = reg.register(metrics.Histogram("edgemesh_test_seconds", "Durations.", ["op"],
                                       buckets=(0.1, 1.0)))
    for v in (0.05, 0.1, 0.5, 2.0):
        h.labels("dial").observe(v)
    fn = reg.register(metrics.Gauge("edgemesh_test_fn", "From a function.", fn=lambda: 7))
    assert fn.render()[-1] == "edgemesh_test_fn 7"
    assert reg.render().splitlines() == [
        "# HELP edgemesh_test_fn From a function.",
        "# TYPE edgemesh_test_fn gauge",
        "edgemesh_test_fn 7",
        "# HELP edgemesh_test_open Open.\\nSecond line",
        "# TYPE edgemesh_test_open gauge",
        "edgemesh_test_open 2.5",
        "# HELP edgemesh_test_requests_total Requests.",
        "# TYPE edgemesh_test_requests_total counter",
        'edgemesh_test_requests_total{code="200"} 3',
        'edgemesh_test_requests_total{code="we\\"ird\\\\"} 1',
        "# HELP edgemesh_test_seconds Durations.",
        "# TYPE edgemesh_test_seconds histogram",
        'edgemesh_test_seconds_bucket{op="dial",le="0.1"} 2',
        'edgemesh_test_seconds_bucket{op="dial",le="1"} 3',
        'edgemesh_test_seconds_bucket{op="dial",le="+Inf"} 4',
        'edgemesh_test_seconds_sum{op="dial"} 2.65',
        'edgemesh_test_seconds_count{op="dial"} 4',
    ]
    assert h.labels("dial").count == 4


def test_registry_rules():
    reg = metrics.Registry()
    first = reg.register(metrics.Counter("edgemesh_x_total", "X.", ["a"]))
    assert reg.register(metrics.Counter("edgemesh_x_total", "X.", ["a"])) is first
    with pytest.raises(ValueError):
        reg.register(metrics.Gauge("edgemesh_x_total", "X.", ["a"]))
    with pytest.raises(ValueError):
        first.labels("1", "2")
    first.labels("1").inc()
    first.remove("1")
    assert reg.render().splitlines()[2:] == []
    assert reg.get("edgemesh_x_total") is first and reg.get("nope") is None
    gauge = metrics.Gauge("edgemesh_y", "Y.")
    for value, text in ((float("inf"), "+Inf"), (float("-inf"), "-Inf"), (float("nan"), "NaN"),
                        (1e-05, "1e-05"), (2.0, "2")):
        gauge.set(value)
        assert gauge.render()[-1] == f"edgemesh_y {text}"
