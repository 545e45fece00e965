"""Async engine client: the engine loop runs in its own thread, never on the event loop.

Requests enter through a thread-safe command queue; a step's outputs are handed to their
requests' asyncio queues by one `call_soon_threadsafe` per event loop (each call wakes the
loop through its self-pipe, a system call: one per output cost the engine thread a fifth of
a 64-request step in session 44's profile). A consumer that stops iterating
(client disconnect, task cancelled) aborts its request, which frees its KV blocks at the
start of the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams

log = logging.getLogger("leapfrog.engine")


class QueueFullError(Exception):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    """Thread-backed client over `LLMEngine`."""

    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self.config = config
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model_name
        self.max_model_len = self.engine.max_model_len
        self.hidden_size = self.engine.model.config.hidden_size
        self.generates = self.engine.model.config.generates
        self.pooling = self.engine.model.config.pooling
        self.metrics = self.engine.metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._pending_adds = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leapfrog-engine", daemon=True)
        self._thread.start()

    # -- client side (event loop) -----------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; the last one has finished=True."""
        if not self.is_alive():
            raise EngineDeadError("the engine loop is not running")
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}")
            if self._pending_adds + len(self.engine.scheduler.waiting) >= self.config.max_waiting:
                raise QueueFullError(f"{self.config.max_waiting} requests are already waiting")
            stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
            self._streams[request_id] = stream
            self._pending_adds += 1
        self._commands.put(("add", request_id, list(prompt_token_ids), params))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stats(self) -> EngineStats:
        s = self.engine.scheduler
        return EngineStats(len(s.running), len(s.waiting) + self._pending_adds,
                           self.engine.blocks.num_free_blocks, self.engine.blocks.num_blocks)

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout=30)

    # -- engine thread ----------------------------------------------------------------------
    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand (request id, output or error) pairs to their streams: one wake-up per loop."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                batches.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt, params = command
            with self._lock:
                self._pending_adds -= 1
            if request_id not in self._streams:  # cancelled before it was queued
                return
            try:
                self.engine.add_request(request_id, prompt, params)
            except ValueError as exc:
                self._deliver([(request_id, exc)])
        elif kind == "abort":
            self.engine.abort_request(command[1])

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            try:
                block = not engine.has_unfinished()
                while True:
                    try:
                        command = self._commands.get(block=block, timeout=0.5 if block else None)
                    except queue.Empty:
                        break
                    self._apply(command)
                    block = False
                if engine.has_unfinished():
                    self._deliver([(out.request_id, out) for out in engine.step()])
            except Exception as exc:  # a bug must not kill serving: fail in-flight requests
                log.exception("engine step failed; aborting in-flight requests")
                self._fail_all(exc)

    def _fail_all(self, exc: Exception) -> None:
        failed = list(self.engine.scheduler.requests)
        for request_id in failed:
            self.engine.abort_request(request_id)
        self._deliver([(rid, RuntimeError(f"engine error: {exc}")) for rid in failed])


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in batch:
        q.put_nowait(item)
