"""Hostile API servers and kubeconfigs (issue 18): a watch line with no newline for 40 MB, a
watch event nested 100,000 deep, a huge, an alias-bomb and a deeply nested kubeconfig. Each is
refused with a clear error and bounded memory, counted where it comes from the network, and
the source carries on with the next good event.
"""
from __future__ import annotations

import logging

import pytest

from edgemesh.errors import ConfigError, RemoteProtocolError
from edgemesh.meta import kubeconn
from edgemesh.meta.kubewire import MAX_EVENT_BYTES, LineSplitter, decode_event
from tests import kubeapi
from tests.kubeapi import KubeAPI
from tests.netlab import wait_for
from tests.unit.test_kube_source import Client, counter

DEEP = 100_000


def _restarts() -> float:
    return counter("edgemesh_meta_watch_restarts_total", "Service", "protocol")


@pytest.fixture
def watched():
    """A KubeSource watching a fake API server's Services."""
    with KubeAPI() as api:
        kubeapi.cluster(api, services=1)
        c = Client(api.url)
        try:
            c.wait_synced()
            wait_for(lambda: api.watching("services"), what="the Service watch")
            yield api, c
        finally:
            c.source.stop()


def test_a_watch_line_without_newline_is_cut_at_the_limit_and_counted(watched, caplog) -> None:
    api, c = watched
    before = _restarts()
    with caplog.at_level(logging.INFO):
        assert api.send_raw("services", b"{" + b" " * (MAX_EVENT_BYTES + 8 * (1 << 20)),
                            chunk=1 << 16) == 1
        wait_for(lambda: _restarts() > before, timeout=30, what="the watch refused")
    wait_for(lambda: api.watching("services"), timeout=10, what="the re-watch")
    api.put("services", kubeapi.service("after", ip="10.96.3.9"))
    wait_for(lambda: "after" in c.names(), timeout=10, what="the next good event")
    assert f"longer than {MAX_EVENT_BYTES} bytes" in caplog.text


def test_a_deeply_nested_watch_event_is_refused_and_counted(watched, caplog) -> None:
    api, c = watched
    before = _restarts()
    deep = (b'{"type":"ADDED","object":{"kind":"Service","metadata":{"name":"deep",'
            b'"namespace":"default"},"spec":' + b"[" * DEEP + b"]" * DEEP + b"}}\n")
    with caplog.at_level(logging.INFO):
        api.send_raw("services", deep)
        wait_for(lambda: _restarts() > before, timeout=30, what="the watch refused")
    assert "nested too deeply" in caplog.text and "Traceback" not in caplog.text
    assert "deep" not in c.names()
    api.put("services", kubeapi.service("after", ip="10.96.3.9"))
    wait_for(lambda: "after" in c.names(), timeout=10, what="the next good event")


def test_the_splitter_never_holds_more_than_the_limit_and_a_chunk() -> None:
    splitter, chunk = LineSplitter(limit=1 << 20), b"x" * 65536
    with pytest.raises(RemoteProtocolError, match="longer than"):
        for _ in range(100):
            splitter.feed(chunk)
            assert splitter.pending <= (1 << 20) + len(chunk)
    with pytest.raises(RemoteProtocolError, match="nested too deeply"):
        decode_event(b'{"type":"ADDED","object":' + b"{\"a\":" * DEEP + b"1" + b"}" * DEEP + b"}")


KUBECONFIG_HEAD = """apiVersion: v1
kind: Config
current-context: edge
contexts: [{name: edge, context: {cluster: c1, user: u1}}]
clusters: [{name: c1, cluster: {server: "https://10.0.0.1:6443"}}]
users: [{name: u1, user: {token: t}}]
"""
LAUGHS = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                   + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]"
                      for p, c in zip("abcdefgh", "bcdefghi", strict=True)])


@pytest.mark.parametrize("body, why", [
    (KUBECONFIG_HEAD + "preferences: {junk: '" + "x" * (17 << 20) + "'}\n",
     "larger than 16777216 bytes"),
    (KUBECONFIG_HEAD + LAUGHS + "\n", "expands to over"),
    (KUBECONFIG_HEAD + "preferences: " + "[" * 100 + "]" * 100 + "\n", "nested deeper than 64"),
    (KUBECONFIG_HEAD + "preferences: " + "[" * 20000 + "]" * 20000 + "\n", "refused"),
], ids=["huge", "billion-laughs", "deep", "very-deep"])
def test_hostile_kubeconfigs_are_refused_with_a_clear_error(tmp_path, body, why) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(body)
    with pytest.raises(ConfigError, match=why) as err:
        kubeconn.from_kubeconfig(str(path))
    assert str(path) in str(err.value)


def test_a_good_kubeconfig_still_loads(tmp_path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG_HEAD)
    assert kubeconn.from_kubeconfig(str(path)).base_url.rstrip("/") == "https://10.0.0.1:6443"
