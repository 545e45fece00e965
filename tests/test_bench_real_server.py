"""`leapfrog bench serve` against our real server on the default model (slow).

Starts `python -m server.cli serve` on a free port, waits for /ready, runs a short bench and
checks: no failures, every token count comes from the server's usage, and the usage totals
equal the server's own Prometheus counters over the run.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.serve import main

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 120


def _missing_server_module() -> str | None:
    for name in ("server.api.app", "server.cli"):
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ImportError:
            return name
    return None


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    missing = _missing_server_module()
    if missing is not None:
        pytest.skip(f"{missing} is not importable yet: the HTTP server is not built")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
                                cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                pytest.fail(f"server not ready after {READY_TIMEOUT_S} s (exit {proc.poll()}):\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_short_run_on_default_model_matches_server_usage(real_server: str, tmp_path: Path) -> None:
    out = tmp_path / "res.json"
    rc = main(["--base-url", real_server, "--num-prompts", "6", "--output-len", "16",
               "--max-concurrency", "3", "--no-progress", "--metrics-interval", "0.2",
               "--result-json", str(out)])
    assert rc == 0
    run = json.loads(out.read_text())["runs"][0]
    assert (run["completed"], run["failed"], run["failure_reasons"]) == (6, 0, {})
    assert run["token_sources"] == {"usage": 6}
    for req in run["requests"]:
        assert 1 <= req["num_chunks"] <= req["output_tokens"] <= 16
        assert req["prompt_tokens"] > 0
    server = run["server"]
    assert server is not None, "the server exposes /metrics"
    assert server["generation_tokens"] == run["total_output_tokens"]
    assert server["prompt_tokens"] == run["total_input_tokens"]


@pytest.mark.slow
def test_embeddings_run_on_default_model(real_server: str, tmp_path: Path, capsys) -> None:
    """`--endpoint embeddings`: each prompt's text embedded; latency as TTFT and E2E, input
    tokens from the usage (the server's own prompt-token counter over the run), none out
    (none counted by the server either)."""
    out = tmp_path / "res.json"
    rc = main(["--base-url", real_server, "--endpoint", "embeddings", "--num-prompts", "6",
               "--max-concurrency", "3", "--no-progress", "--metrics-interval", "0.2",
               "--result-json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "Request throughput" in table or "request" in table.lower()
    run = json.loads(out.read_text())["runs"][0]
    assert (run["completed"], run["failed"]) == (6, 0)
    assert run["token_sources"] == {"usage": 6} and run["total_output_tokens"] == 0
    for req in run["requests"]:
        assert req["prompt_tokens"] > 0 and req["output_tokens"] == 0
        assert req["ttft_s"] == req["e2el_s"] > 0
    assert run["server"]["prompt_tokens"] == run["total_input_tokens"]
    assert run["server"]["generation_tokens"] == 0  # (as the usage: no token is returned)
