"""A dependency-free progress bar on stderr: one line, redrawn as requests finish."""

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

    def update(self, success: bool) -> None:
        """One more request finished."""
        self.done += 1
        self.failed += 0 if success else 1
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self._start
        self.stream.write(
            f"\r{self.label}[{bar}] {self.done}/{self.total} "
            f"failed {self.failed}  {elapsed:6.1f}s"
        )
        self.stream.flush()

    def close(self) -> None:
        """End the line."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
