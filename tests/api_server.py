"""Helpers that run the API for tests: in a thread (fake engine, fast) or as a subprocess
(`python -m server.cli serve`, the real default model, shared by the live test modules)."""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from server.api.app import create_app
from server.api.config import ApiConfig
from server.api.state import EngineClient, ServerState

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def app_in_thread(loader: Callable[[], EngineClient], api: ApiConfig | None = None,
                  wait_ready: bool = True) -> Iterator[tuple[str, ServerState]]:
    """Serve create_app() with uvicorn in a thread on a free port; yields (base URL, state)."""
    api = api or ApiConfig()
    state = ServerState(loader=loader, retry_after_s=api.retry_after_s)
    config = uvicorn.Config(create_app(api, state), host="127.0.0.1", port=0,
                            log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    if wait_ready:
        assert state.loaded.wait(10), "engine did not load"
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m server.cli serve` on the default model, as a subprocess."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = REPO / ".pytest_cache" / f"leapfrog-serve-{self.port}.log"
        self.log_path.parent.mkdir(exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port), *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)

    def wait_ready(self, timeout: float = 180.0) -> LiveServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{self.log()}"
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


_shared: LiveServer | None = None
SHARED_ARGS = ("--max-model-len", "512", "--kv-cache-memory-gb", "0.25", "--max-num-seqs", "32")


class ExternalServer:
    """A server someone else started (LEAPFROG_TEST_SERVER_URL), with SHARED_ARGS' limits."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")


def shared_server() -> LiveServer | ExternalServer:
    """One live server for every live test module of the session (stopped at exit), or the
    already running one named by LEAPFROG_TEST_SERVER_URL."""
    global _shared
    if os.environ.get("LEAPFROG_TEST_SERVER_URL"):
        return ExternalServer(os.environ["LEAPFROG_TEST_SERVER_URL"])
    if _shared is None:
        _shared = LiveServer(*SHARED_ARGS).wait_ready()
        atexit.register(_shared.stop)
    return _shared
