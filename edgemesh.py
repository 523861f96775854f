"""Frozen-binary entry point: nothing but calling the CLI."""
from edgemesh.cli import entry

if __name__ == "__main__":
    entry()
