"""Logs are one event per line whatever happens: a traceback is a field of its event (an escaped
string in logfmt, an array in JSON), and exceptions nobody caught, in any thread, still arrive
as one event naming the phase."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading

import pytest

from appliance import log


@pytest.fixture
def captured(monkeypatch):
    """The appliance's log configuration, writing to a buffer instead of stderr."""

    def configure(style: str) -> io.StringIO:
        buffer = io.StringIO()
        monkeypatch.setattr(sys, "stderr", buffer)
        log.configure(style=style)
        return buffer

    saved = (logging.getLogger().handlers[:], sys.excepthook, threading.excepthook)
    yield configure
    logging.getLogger().handlers[:] = saved[0]
    sys.excepthook, threading.excepthook = saved[1], saved[2]


def _fail() -> None:
    raise ValueError("bad value\nwith a second line")


def test_an_exception_is_one_logfmt_line_with_the_traceback_folded_in(captured):
    out = captured("logfmt")
    try:
        _fail()
    except ValueError:
        log.get_logger("storage").exception("instance.failed", phase="commit")
    [line] = out.getvalue().splitlines()
    assert "event=instance.failed" in line
    assert "phase=commit" in line
    assert "traceback=" in line
    assert "_fail" in line  # the frame is there, escaped onto the one line
    assert "\\n" in line


def test_an_exception_in_json_carries_the_traceback_as_an_array(captured):
    out = captured("json")
    try:
        _fail()
    except ValueError:
        log.get_logger("pipeline").exception("image.failed", phase="render")
    [line] = out.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "image.failed"
    assert event["phase"] == "render"
    assert isinstance(event["traceback"], list)
    assert any("ValueError: bad value" in part for part in event["traceback"])


def test_a_crash_in_a_thread_nobody_watches_is_one_event_with_its_phase(captured):
    out = captured("logfmt")
    thread = threading.Thread(target=_fail, name="receive-thread")
    thread.start()
    thread.join()
    [line] = out.getvalue().splitlines()
    assert "event=thread.crashed" in line
    assert "phase=run" in line
    assert "thread=receive-thread" in line
    assert "ValueError" in line
