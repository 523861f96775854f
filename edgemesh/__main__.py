"""``python -m edgemesh``."""
from edgemesh.cli import entry

entry()
