"""Inputs the atheris targets (tests/fuzz/targets.py) found crashing, each kept as a test."""
from __future__ import annotations

import pytest

from edgemesh import config as cfg
from edgemesh.errors import ConfigError, RemoteProtocolError
from edgemesh.meta import kubewire


def test_config_that_is_not_utf8_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\n\xfb")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 1\)"):
        cfg.load(str(path))


def test_watch_event_whose_type_is_not_a_string_is_a_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError, match="not a watch event"):
        kubewire.decode_event(b'{"type": {"kind": "Status"}, "object": {}}')
