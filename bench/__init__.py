"""Benchmarks against peer tools.

``python -m bench`` lists them; ``python -m bench.<name>`` runs one.
"""
