"""A dependency-free progress bar on stderr: one line redrawn as requests finish on a
terminal; on a pipe or log file, one plain line per tenth of the run instead."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Counts finished requests (and failures) out of a total; silent when disabled."""

    def __init__(self, total: int, label: str = "", enabled: bool = True,
                 stream: TextIO | None = None, width: int = 30) -> None:
        self.total, self.label, self.enabled, self.width = total, label, enabled, width
        self.stream = stream if stream is not None else sys.stderr
        self.done = self.failed = 0
        self._start = time.perf_counter()
        self._tty = self.stream.isatty()

    def update(self, success: bool) -> None:
        """One more request finished."""
        self.done += 1
        self.failed += 0 if success else 1
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        step = max(self.total // 10, 1)
        if not self._tty and self.done % step and self.done != self.total:
            return
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self._start
        line = f"{self.label}[{bar}] {self.done}/{self.total} failed {self.failed}  {elapsed:6.1f}s"
        self.stream.write("\r" + line if self._tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the line."""
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()
