"""uvicorn with our own shutdown: the first SIGTERM/SIGINT starts draining (readiness and new
requests get 503, in-flight requests run on), and the server stops once nothing is in flight
or the drain timeout passes. A second signal stops at once. The process then exits 0."""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from server.api.state import ServerState

logger = logging.getLogger("leapfrog.api")


class DrainingServer(uvicorn.Server):
    """A uvicorn.Server whose signal handling drains in-flight requests before exiting."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self._drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: set flags only. Not calling super() also keeps uvicorn
        # from re-raising the signal after shutdown, so a drained exit is a clean exit 0.
        if self._drain_started is None:
            self._drain_started = time.monotonic()
            self.state.draining = True
        else:
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT

    async def on_tick(self, counter: int) -> bool:
        if self._drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self._drain_started
            if self.state.in_flight == 0 or waited >= self.drain_timeout_s:
                logger.info("drained (%d request(s) still in flight after %.1fs); shutting down",
                            self.state.in_flight, waited)
                self.should_exit = True
        if self.state.load_error is not None:
            self.should_exit = True
        return await super().on_tick(counter)
