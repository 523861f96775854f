"""Fault injection: the mesh under real traffic while relays die, NAT mappings vanish, the API
goes away, agents are killed, links turn bad and clocks jump (``make chaos``; a short version
runs in ``make test``)."""
