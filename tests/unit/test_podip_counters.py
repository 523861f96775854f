"""The Edge CNI's per-peer datagram counters (``podip.PodUDPPort.forward``): each datagram a
client sends to a remote Pod is counted under the node of its session's Pod, with its bytes."""
from __future__ import annotations

from types import SimpleNamespace

from edgemesh.meta.store import Backend
from edgemesh.proxy import podip
from edgemesh.proxy.udp import TransparentUDPPort


def test_datagrams_are_counted_per_peer_node(monkeypatch) -> None:
    sent: list[tuple[str, bytes]] = []
    monkeypatch.setattr(TransparentUDPPort, "forward",
                        lambda self, session, data: sent.append((session.backend.ip, data)))
    pods = SimpleNamespace(node="a1")
    port = podip.PodUDPPort(None, pods, idle_timeout=60, max_sessions=16)  # type: ignore[arg-type]
    to_b = SimpleNamespace(backend=Backend("10.244.2.5", 53, "b7"))
    to_c = SimpleNamespace(backend=Backend("10.244.3.5", 53, "c7"))
    for session, data in ((to_b, b"x"), (to_b, b"hello"), (to_c, b"abc")):
        port.forward(session, data)
    assert sent == [("10.244.2.5", b"x"), ("10.244.2.5", b"hello"), ("10.244.3.5", b"abc")]
    assert podip.POD_DATAGRAMS.labels("b7").value == 2
    assert podip.POD_DATAGRAM_BYTES.labels("b7").value == 6
    assert podip.POD_DATAGRAMS.labels("c7").value == 1
    assert podip.POD_DATAGRAM_BYTES.labels("c7").value == 3
