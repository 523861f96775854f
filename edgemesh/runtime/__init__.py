"""Greenlet spawning, logging, metrics and the admin HTTP endpoint."""
