"""Example manifests and the demo world (examples/demo)."""
