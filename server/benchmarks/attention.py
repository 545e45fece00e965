"""`leapfrog bench attention`: the CPU path's attention of decode and verification steps,
the native kernel (`kernels.cpu_attention.paged_attention`) against torch's padded SDPA, which
the engine takes where the native kernels do not run.

Two parts, the two sides alternating in one process (best of `--repeats`):
- one layer's attention call as the engine makes it (`server.models.batch.attention`, its
  step metadata built by `batch_meta`), at the default model's shape (9 heads, 3 KV heads,
  dim 64) for each batch size x context x queries a sequence (1: decode; more:
  verification of drafts), in microseconds;
- decode of the default model (float32 activations, the GGUF served packed), tokens/s at
  each batch size, and whether both sides gave the same tokens. With the native attention
  the decoder layers run in one native call (`kernels.cpu_layers`); without it, one by
  one with torch's attention.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from server.benchmarks.common import (
    config_of,
    decode_side_by_side,
    machine,
    side_by_side,
    table,
    write_json,
)

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--contexts", default="100,600,2000", help="tokens of context a sequence")
    p.add_argument("--queries", default="1,9", help="query tokens a sequence (1: decode)")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated a request (decode)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of each side (best is kept)")
    p.add_argument("--no-decode", action="store_true", help="time the attention calls only")
    p.add_argument("--result-json", default=None, help="write results here")


@contextmanager
def _torch_attention() -> Iterator[None]:
    """Within it the step metadata offers no sequences to the native kernel."""
    from kernels import cpu_attention

    real = cpu_attention.attention_step
    cpu_attention.attention_step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        cpu_attention.attention_step = real


def _call(batch: int, context: int, queries: int, repeats: int) -> tuple[float, float]:
    """Microseconds of one layer's attention call, native and torch."""
    from server.engine.batch_builder import batch_meta
    from server.models.batch import attention

    per_seq = -(-context // BLOCK)
    caches = [torch.randn(batch * per_seq, BLOCK, KV_HEADS, DIM) for _ in range(2)]
    blocks = torch.randperm(batch * per_seq).tolist()
    tables = [blocks[i * per_seq:(i + 1) * per_seq] for i in range(batch)]
    positions = [p for _ in range(batch) for p in range(context - queries, context)]
    starts = [i * queries for i in range(batch + 1)]
    q = torch.randn(batch * queries, HEADS, DIM)

    def run(_: bool) -> float:  # the side is the step metadata's
        meta = batch_meta([tables], positions, [context] * batch, starts, BLOCK,
                          torch.device("cpu"), True)
        attention(q, None, None, *caches, meta, DIM ** -0.5)  # the padded group built once
        calls = 20
        start = time.perf_counter()
        for _ in range(calls):
            attention(q, None, None, *caches, meta, DIM ** -0.5)
        return (time.perf_counter() - start) / calls * 1e6

    return side_by_side(run, repeats, _torch_attention)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def run(args: argparse.Namespace) -> int:
    from kernels import cpu_native

    if not cpu_native.available():
        print("the native CPU kernels do not run here: nothing to compare")
        return 1
    calls = []
    for b in _ints(args.batch_sizes):
        for c in _ints(args.contexts):
            for q in _ints(args.queries):
                native, padded = _call(b, c, q, args.repeats)
                calls.append({"batch": b, "context": c, "queries": q, "native_us": native,
                              "torch_us": padded, "ratio": padded / native})
    print(f"one layer's attention call (us), {HEADS} heads, {KV_HEADS} KV heads, dim {DIM}, "
          f"{cpu_native.variant_in_use()}, {torch.get_num_threads()} threads")
    print(table(["batch", "context", "queries", "native", "torch", "torch / native"],
                [list(r.values()) for r in calls]))
    decode = [] if args.no_decode else decode_side_by_side(
        _ints(args.batch_sizes), args.tokens, args.repeats, _torch_attention, ("native", "torch"))
    if decode:
        print(f"\ndefault model decode (tokens/s), {args.tokens} tokens a request")
        print(table(["batch", "native", "torch", "native / torch", "same tokens"],
                    [list(r.values()) for r in decode]))
    write_json(args.result_json, {"machine": machine(), "config": config_of(args),
                                  "calls": calls, "decode": decode})
    return 0
