"""Logs: klog-like text or JSON lines on stderr, klog's numeric verbosity."""
from __future__ import annotations

import json
import logging
import os
import re

import pytest

from edgemesh.runtime import logs

KLOG = re.compile(r"^([IWEF])(\d{4}) (\d\d:\d\d:\d\d)\.(\d{6}) +(\d+) ([\w.]+):(\d+)\] (.*)$")


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("verbosity, level", [(0, logging.WARNING), (1, logging.INFO),
                                              (2, logging.INFO), (3, logging.DEBUG),
                                              (6, logging.DEBUG)])
def test_verbosity_levels(verbosity, level):
    assert logs.level_for(verbosity) == level


def emit_all(name: str) -> None:
    log = logging.getLogger(name)
    log.debug("debug line")
    log.info("info %s", "line")
    log.warning("warning line")
    log.error("error line")


def test_klog_text_format(capsys, restore_root):
    logs.setup("text", 2)
    emit_all("edgemesh.test")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3  # no debug at -v 2
    parsed = [KLOG.match(line) for line in lines]
    assert all(parsed), lines
    assert [m.group(1) for m in parsed] == ["I", "W", "E"]
    assert [m.group(8) for m in parsed] == ["info line", "warning line", "error line"]
    assert {m.group(5) for m in parsed} == {str(os.getpid())}
    assert parsed[0].group(6) == "test_logs.py"


def test_klog_microseconds_are_real():
    record = logging.LogRecord("x", logging.INFO, "f.py", 1, "m", None, None)
    record.created = 1_700_000_000.123456
    line = logs.KlogFormatter().format(record)
    assert KLOG.match(line).group(4) == "123456"


def test_verbosity_0_is_warnings_only_and_3_adds_debug(capsys, restore_root):
    logs.setup("text", 0)
    emit_all("edgemesh.test")
    assert [line[0] for line in capsys.readouterr().err.splitlines()] == ["W", "E"]
    logs.setup("text", 3)
    emit_all("edgemesh.test")
    assert [line[0] for line in capsys.readouterr().err.splitlines()] == ["D", "I", "W", "E"]


def test_json_format(capsys, restore_root):
    logs.setup("json", 2)
    emit_all("edgemesh.test")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("edgemesh.test").exception("failed")
    docs = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [d["level"] for d in docs] == ["info", "warning", "error", "error"]
    assert docs[0]["msg"] == "info line" and docs[0]["logger"] == "edgemesh.test"
    assert docs[0]["caller"].startswith("test_logs.py:")
    assert isinstance(docs[0]["ts"], float)
    assert "ValueError: boom" in docs[3]["error"]


def test_once_logs_each_key_once_and_is_bounded():
    once = logs.Once(limit=2)
    assert once("a") and not once("a")
    assert once("b") and not once("c")  # full: further keys are only counted by callers
