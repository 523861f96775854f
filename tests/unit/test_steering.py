"""The transparent listeners' lookup from original destination to handler (sans-IO)."""
from __future__ import annotations

from edgemesh.proxy.steering import Steering


def test_exact_addresses_then_ranges_then_node_ports() -> None:
    table: Steering[str] = Steering()
    table.register(["10.96.0.10", "192.0.2.50"], 80, "web")
    table.register(["fd00:10:96:0::20"], 80, "web6")  # kept canonical
    table.register_node_port(30080, "web-nodeport")
    table.register_range("100.64.0.0/10", (1, 65535), "pods")
    assert table.lookup("10.96.0.10", 80) == table.lookup("192.0.2.50", 80) == "web"
    assert table.lookup("fd00:10:96::20", 80) == "web6"
    assert table.lookup("10.96.0.10", 81) is None  # the port is part of the key
    assert table.lookup("100.64.3.4", 9100) == "pods"
    assert table.lookup("192.168.50.1", 30080) == "web-nodeport"  # any local address
    assert table.lookup("100.64.3.4", 30080) == "pods"  # a range before NodePorts
    assert len(table) == 5


def test_unregister_leaves_entries_another_handler_took() -> None:
    table: Steering[str] = Steering()
    table.register(["10.96.0.10"], 80, "old")
    table.register(["10.96.0.10"], 80, "new")  # two services claim one address: last wins
    table.register_node_port(30080, "new")
    table.unregister(["10.96.0.10"], 80, "old")
    table.unregister_node_port(30080, "old")
    assert table.lookup("10.96.0.10", 80) == "new" and table.lookup("1.2.3.4", 30080) == "new"
    table.unregister(["10.96.0.10"], 80, "new")
    table.unregister_node_port(30080, "new")
    table.register_range("100.64.0.0/10", (1, 65535), "pods")
    table.unregister_range("100.64.0.0/10", "pods")
    assert len(table) == 0 and table.lookup("10.96.0.10", 80) is None
