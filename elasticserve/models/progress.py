"""Progress of long work (making, training a model) on stderr, without any dependency.

On a terminal one status line is redrawn in place; anywhere else (a log file, a pipe, a
container's log) only the start and finish lines are written, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO


class Progress:
    """``with Progress("training models/demo-llama") as p: ... p.update("step 3/10")``.

    Writes ``WHAT ...`` at the start and ``WHAT: done in 12.3 s (DETAIL)`` at the end (or
    ``failed after``); ``update`` redraws a status line at most every ``interval_s`` when the
    stream is a terminal and is silent otherwise.
    """

    def __init__(self, what: str, stream: TextIO | None = None, interval_s: float = 0.25):
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.detail = ""  # shown in the finish line
        self._start = self._last = 0.0
        self._drawn = False

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        self._write(f"{self.what} ...\n")
        return self

    def update(self, status: str) -> None:
        """Redraw the status line (terminals only, throttled)."""
        now = time.monotonic()
        if not self.tty or now - self._last < self.interval_s:
            return
        self._last = now
        # \r back to the line start, \x1b[K clears what a longer previous status left
        self._write(f"\r{self.what}: {status} [{now - self._start:.0f} s]\x1b[K")
        self._drawn = True

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        prefix = "\r" if self._drawn else ""
        clear = "\x1b[K" if self._drawn else ""
        if exc_type is None:
            detail = f" ({self.detail})" if self.detail else ""
            self._write(f"{prefix}{self.what}: done in {self.elapsed_s:.1f} s{detail}{clear}\n")
        else:
            self._write(f"{prefix}{self.what}: failed after {self.elapsed_s:.1f} s{clear}\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
