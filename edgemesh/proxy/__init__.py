"""Service proxy: iptables rules, listeners, TCP/UDP/HTTP pumps, load balancing."""
