"""The demo world: examples/demo/world.py."""
