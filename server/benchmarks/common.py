"""Shared helpers of the offline benchmarks: timing, tables, JSON."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` runs in seconds (the machine is shared; the minimum is the least noisy)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def pydoc_text() -> str:
    """A long English text on every machine: Python's own documentation (`pydoc_data`),
    its topics in name order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def side_by_side(run: Callable[[bool], float], repeats: int,
                 off: Callable[[], AbstractContextManager]) -> tuple[float, float]:
    """Best of `repeats` of run(True) and of run(False) inside `off()` (a measure where lower
    is better), alternating in each round: the machine's drift falls on both sides."""
    on, other = float("inf"), float("inf")
    for _ in range(repeats):
        on = min(on, run(True))
        with off():
            other = min(other, run(False))
    return on, other


def decode_side_by_side(batch_sizes: list[int], tokens: int, repeats: int,
                        off: Callable[[], AbstractContextManager],
                        names: tuple[str, str]) -> list[dict[str, object]]:
    """Greedy decode of the default model (float32 activations, the GGUF served packed), a
    chat prompt repeated `batch` times, as usual and inside `off()`, alternating: tokens/s
    ((tokens - 1) / (t(tokens) - t(1)), so prefill cancels out) of each side (`names`) at
    each batch size, their ratio, and whether both gave the same tokens."""
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    llm = LLM(None, max_num_seqs=max(batch_sizes), max_num_batched_tokens=2048,
              enable_prefix_caching=False)
    ids = llm.encode(PROMPT, chat=True)
    outputs: dict[bool, list[list[int]]] = {}

    def generate(batch: int, n: int, on: bool) -> float:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        done = llm.generate([ids] * batch, params)
        seconds = time.perf_counter() - start
        outputs[on] = [c.token_ids for c in done]
        return seconds

    rows = []
    generate(1, 4, True)  # warm-up
    for b in batch_sizes:
        t1 = side_by_side(lambda on, b=b: generate(b, 1, on), repeats, off)
        tn = side_by_side(lambda on, b=b: generate(b, tokens, on), repeats, off)
        on, other = ((tokens - 1) * b / (n - one) for n, one in zip(tn, t1, strict=True))
        rows.append({"batch": b, names[0]: on, names[1]: other, "ratio": on / other,
                     "same_tokens": outputs[True] == outputs[False]})
    return rows


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> dict[str, object]:
    return {"platform": platform.platform(), "processor": platform.processor(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def config_of(args: object) -> dict[str, object]:
    """The command's options, without argparse's dispatch entry."""
    return {k: v for k, v in vars(args).items() if not callable(v)}


def write_json(path: str | None, payload: dict[str, object]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")
