"""Progress bars redraw rarely when nobody watches a terminal, so logs stay readable."""

from __future__ import annotations

import io
import sys

import pytest

from quantvla_ros.progress import LOG_INTERVAL, Progress

pytestmark = pytest.mark.unit


def test_a_log_gets_a_redraw_at_most_every_interval(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    log = io.StringIO()
    for _ in Progress(range(1000), file=log):
        pass
    assert Progress(range(3), file=io.StringIO()).mininterval == LOG_INTERVAL
    assert log.getvalue().count("\r") <= 3  # first draw, final draw, close


def test_a_terminal_gets_tqdms_live_bar(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert Progress(range(3), file=io.StringIO()).mininterval < 1
