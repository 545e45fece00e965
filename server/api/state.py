"""Server lifecycle state: the engine (loaded in a background thread), draining, in-flight count.

The HTTP server comes up before the model is loaded so /health and /ready answer at once;
generation endpoints answer 503 until `engine` is set and again once draining starts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from server.api.errors import ApiError
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.metrics import Metrics

logger = logging.getLogger("leapfrog.api")


class EngineClient(Protocol):
    """What the API needs from the engine (server.engine.async_engine.AsyncEngine)."""

    tokenizer: Any
    model_name: str
    max_model_len: int
    hidden_size: int
    """The length of an embedding (/v1/embeddings)."""
    generates: bool
    """Whether the model has a language-model head (`ModelConfig.generates`)."""
    pooling: str | None
    """The pooling the model's files name for embeddings (`ModelConfig.pooling`)."""
    metrics: Metrics

    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[RequestOutput]: ...
    def abort(self, request_id: str) -> None: ...
    def is_alive(self) -> bool: ...
    def stats(self) -> Any: ...
    def shutdown(self) -> None: ...


@dataclass
class ServerState:
    """Mutable lifecycle state shared by the routes and the uvicorn server (one per app)."""

    loader: Callable[[], EngineClient]
    """Builds the engine (blocking); run once in a background thread by `start_loading`."""
    check: Callable[[EngineClient], None] | None = None
    """Run on the built engine before it serves: what it raises fails the load (flags that
    do not fit the model, e.g. `--score-tokens` that are not tokens of its vocabulary)."""
    retry_after_s: int = 1
    engine: EngineClient | None = None
    load_error: BaseException | None = None
    draining: bool = False
    in_flight: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.loaded = threading.Event()
        """Set once loading ended, successfully or not."""

    def start_loading(self) -> threading.Thread:
        def run() -> None:
            try:
                engine = self.loader()
                if self.check is not None:
                    try:
                        self.check(engine)
                    except BaseException:
                        engine.shutdown()
                        raise
                self.engine = engine
                logger.info("engine ready: serving %s", self.engine.model_name)
            except BaseException as exc:  # reported through /health and the exit code
                logger.exception("engine failed to load")
                self.load_error = exc
            finally:
                self.loaded.set()

        thread = threading.Thread(target=run, name="leapfrog-engine-loader", daemon=True)
        thread.start()
        return thread

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def require_engine(self) -> EngineClient:
        """The engine, or a 503 while loading, draining or after a failed load."""
        if self.draining:
            raise self._unavailable("The server is shutting down.", "draining")
        if self.engine is None:
            reason = "failed to load" if self.load_error else "is still loading"
            raise self._unavailable(f"The model {reason}.", "loading")
        return self.engine

    def _unavailable(self, message: str, code: str) -> ApiError:
        return ApiError(503, message, code=code, headers={"Retry-After": str(self.retry_after_s)})

    def acquire(self) -> Callable[[], None]:
        """Count one in-flight generation request; returns its idempotent release function."""
        with self._lock:
            self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self.in_flight -= 1

        return release
