"""``edgemesh status``'s Edge CNI section: per-peer counts read from Prometheus text, and the
lines it prints (none when the Edge CNI is off)."""
from __future__ import annotations

from edgemesh.status import cni_peer_counts, render, render_edge_cni

METRICS = """# HELP edgemesh_cni_pod_connections_total TCP connections to remote Pod IPs, by node.
# TYPE edgemesh_cni_pod_connections_total counter
edgemesh_cni_pod_connections_total{node="b1"} 7.0
edgemesh_cni_pod_connections_total{node="cloud"} 2.0
edgemesh_cni_pod_udp_sessions_total{node="b1"} 1.0
edgemesh_cni_pod_datagrams_total{node="b1"} 12.0
edgemesh_cni_pod_datagram_bytes_total{node="b1"} 3456.0
edgemesh_tunnel_streams_refused_total{reason="not_local_endpoint"} 3.0
edgemesh_cni_pod_datagrams_total{node="broken"} nan-ish
"""


def test_peer_counts_come_from_the_cni_counters_only() -> None:
    peers = cni_peer_counts(METRICS)
    assert peers == {
        "b1": {"tcp_connections": 7.0, "udp_sessions": 1.0, "datagrams": 12.0,
               "datagram_bytes": 3456.0},
        "cloud": {"tcp_connections": 2.0, "udp_sessions": 0.0, "datagrams": 0.0,
                  "datagram_bytes": 0.0}}


def test_the_section_lists_pod_networks_and_peers() -> None:
    cni = {"pod_ips": 3, "pod_cidrs": ["10.244.2.0/24"],
           "steered": {"tcp": ["10.244.2.0/24", "10.9.0.7/32"], "udp": ["10.244.2.0/24"]},
           "peers": cni_peer_counts(METRICS)}
    text = render({"node": {"node": "a1", "synced": True}, "edgeCNI": cni})
    assert "EDGE CNI: 3 Pod IPs known, 2 remote Pod networks carried" in text
    lines = text.splitlines()
    assert any(line.split() == ["10.244.2.0/24", "TCP/UDP"] for line in lines)
    assert any(line.split() == ["10.9.0.7/32", "TCP"] for line in lines)
    assert any(line.split() == ["b1", "7", "1", "12", "3456"] for line in lines)
    assert render_edge_cni(None) == []
