"""Progress bars for long work: tqdm's bar on a terminal; in a log (stderr not a terminal: a
launch file's output, CI, a pipe) the bar is redrawn at most every LOG_INTERVAL seconds, so a
long run leaves a few lines of progress instead of one per step."""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL = 30.0


class Progress(tqdm):
    def __init__(self, *args, **kwargs) -> None:
        if not sys.stderr.isatty():
            kwargs.setdefault("mininterval", LOG_INTERVAL)
        super().__init__(*args, **kwargs)
