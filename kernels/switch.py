"""`Switch`: an on/off setting the kernels read when they launch, which benchmarks and
tests turn off for a block (programmatic dependent launch, the GEMV sums, the GEMV table)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Switch:
    """True while on; `off()` turns it off inside a block and restores it after."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __bool__(self) -> bool:
        return self.on

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        before, self.on = self.on, False
        try:
            yield
        finally:
            self.on = before
