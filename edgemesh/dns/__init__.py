"""Node-local DNS: zone logic (sans-IO), upstream forwarder and cache, UDP/TCP servers."""
