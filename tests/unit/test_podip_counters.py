"""The Edge CNI's per-peer datagram counters (``podip.PodUDPPort``): each datagram to a remote
Pod counted under its node, with its bytes; none for this node's Pods or unknown addresses
(dropped), and the lookup redone when the pod map changes (a Pod that moved)."""
from __future__ import annotations

from types import SimpleNamespace

from edgemesh.proxy import podip
from edgemesh.proxy.podmap import PodMap
from edgemesh.proxy.udp import TransparentUDPPort


def value(counter, node: str) -> float:
    return counter.labels(node).value


def test_datagrams_are_counted_per_peer_node(monkeypatch) -> None:
    sent: list[bytes] = []
    monkeypatch.setattr(TransparentUDPPort, "datagram",
                        lambda self, data, client, local: sent.append(data))
    pods = SimpleNamespace(node="a1", map=PodMap(ips={"10.244.2.5": "b9", "10.244.1.5": "a1"}))
    port = podip.PodUDPPort(None, pods, idle_timeout=60, max_sessions=16)  # type: ignore[arg-type]
    before = (value(podip.POD_DATAGRAMS, "b9"), value(podip.POD_DATAGRAM_BYTES, "b9"))
    client = ("10.244.1.7", 40000)
    for data in (b"x", b"hello"):
        port.datagram(data, client, ("10.244.2.5", 53))
    port.datagram(b"local", client, ("10.244.1.5", 53))  # this node's own Pod: dropped
    port.datagram(b"nobody", client, ("10.244.9.9", 53))  # no Pod there: dropped
    assert sent == [b"x", b"hello"]
    assert value(podip.POD_DATAGRAMS, "b9") == before[0] + 2
    assert value(podip.POD_DATAGRAM_BYTES, "b9") == before[1] + 6
    pods.map = PodMap(ips={"10.244.2.5": "c9"})  # the Pod moved: counted under its new node
    port.datagram(b"moved", client, ("10.244.2.5", 53))
    assert value(podip.POD_DATAGRAMS, "c9") == 1 and sent[-1] == b"moved"
