"""Inputs the atheris targets (tests/fuzz/targets.py) found crashing, each kept as a test."""
from __future__ import annotations

import pytest

from edgemesh import config as cfg
from edgemesh.errors import ConfigError, RemoteProtocolError
from edgemesh.meta import kubewire
from edgemesh.proxy.http_head import (
    HeadError,
    HeadLimits,
    parse_response_framing,
    parse_response_head,
)


def test_config_that_is_not_utf8_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\n\xfb")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 1\)"):
        cfg.load(str(path))


def test_watch_event_whose_type_is_not_a_string_is_a_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError, match="not a watch event"):
        kubewire.decode_event(b'{"type": {"kind": "Status"}, "object": {}}')


def test_response_framing_fast_path_reports_the_first_bad_field_like_the_full_parse() -> None:
    head = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 4, 5\r\n\r\n")
    limits = HeadLimits(max_size=2048, max_fields=20)
    causes = []
    for parse in (parse_response_framing, parse_response_head):
        with pytest.raises(HeadError) as e:
            parse(head, b"GET", limits)
        causes.append((e.value.status, e.value.cause))
    assert causes[0] == causes[1] == (502, "bad_transfer_encoding")
