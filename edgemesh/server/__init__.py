"""``edgemesh server``: the rendezvous and relay server."""
