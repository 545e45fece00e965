"""Timed decode and verification steps of a model on CUDA, through `CudaGraphRunner` over
a fresh KV cache: the harness of the GPU decode benchmark (`server.benchmarks.gpu_decode`)
and of the GPU engine tests."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import torch

from server.engine.cuda_graphs import CudaGraphRunner
from server.models.llama import LlamaForCausalLM

BLOCK = 16


@contextlib.contextmanager
def decode_runner(model: LlamaForCausalLM, batch: int, context: int, steps: int,
                  max_query_len: int = 1) -> Iterator[tuple[CudaGraphRunner, list[list[int]]]]:
    """A fresh KV cache for `batch` sequences of `context` + `steps` tokens, and a
    `CudaGraphRunner` over it (steps of up to `max_query_len` tokens a sequence) with each
    sequence's block table; freed on exit."""
    per_seq = -(-(context + steps + 8) // BLOCK)
    num_blocks = batch * per_seq + 1
    c = model.config
    shape = (num_blocks, BLOCK, c.num_kv_heads, c.head_dim)
    model.kv_caches = [(torch.zeros(shape, dtype=model.dtype, device="cuda"),
                        torch.zeros(shape, dtype=model.dtype, device="cuda"))
                       for _ in range(c.num_layers)]
    runner = CudaGraphRunner(model, BLOCK, num_blocks - 1, per_seq * BLOCK, batch,
                             max_query_len)
    try:
        yield runner, [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    finally:
        model.kv_caches = []
        del runner
        torch.cuda.empty_cache()


def decode_steps(model: LlamaForCausalLM, batch: int, context: int, steps: int,
                 graphed: bool) -> Iterator[tuple[float, torch.Tensor]]:
    """Greedy decode steps at `batch` sequences of `context` tokens (whose greedy tokens
    feed the next step): (host seconds, logits [batch, vocab] on the device) per step."""
    tokens = [[1]] * batch
    with decode_runner(model, batch, context, steps) as (runner, tables), \
            torch.inference_mode():
        for step in range(steps):
            start = time.perf_counter()
            _, logits, greedy = runner.step(batch, 1, [context + step] * batch, tokens, tables,
                                            graphed)
            tokens = [[t] for t in greedy[:batch].tolist()]
            yield time.perf_counter() - start, logits[:batch]


def time_replays(model: LlamaForCausalLM, context: int, replays: int) -> float:
    """Device seconds of one batch-1 decode step: the captured graph replayed `replays`
    times back to back (the same inputs) between two syncs, so no host work sits between
    steps; against `time_decode` this gives the host's share of a step."""
    with decode_runner(model, 1, context, 1) as (runner, tables), torch.inference_mode():
        runner.step(1, 1, [context], [[1]], tables)  # captures
        return _replay_seconds(runner.graphs[(1, 1)].graph, replays)


def _replay_seconds(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Seconds a replay of `graph`, `replays` back to back between two syncs (after one)."""
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / replays


def graph_costs(model: LlamaForCausalLM, context: int, batches: tuple[int, ...],
                max_query_len: int, replays: int = 50) -> dict[tuple[int, int], float]:
    """Device seconds of one step by (batch, Q), for Q in the graph runner's query buckets
    up to `max_query_len`: each CUDA graph replayed back to back between two syncs, as
    `time_replays`. Against Q = 1 (decode), what verifying Q - 1 drafts a sequence costs
    at each batch, which is what the speculation policy weighs."""
    out = {}
    with decode_runner(model, max(batches), context, max_query_len, max_query_len) as (
            runner, tables), torch.inference_mode():
        for b in batches:
            for q in runner.query_buckets:
                runner.step(b, q, [context] * b, [[1] * q] * b, tables[:b])  # captures
                out[(b, q)] = _replay_seconds(runner.graphs[(b, q)].graph, replays)
    return out


def print_graph_costs(label: str, costs: dict[tuple[int, int], float]) -> None:
    queries = sorted({q for _, q in costs})
    print(f"device us a step by batch and Q ({label}):", flush=True)
    for b in sorted({b for b, _ in costs}):
        print(f"  b={b:<3}" + "".join(f"  Q={q} {costs[(b, q)] * 1e6:6.0f}" for q in queries),
              flush=True)


def time_decode(model: LlamaForCausalLM, batch: int, context: int, steps: int,
                graphed: bool) -> float:
    """Median seconds of one decode step at `batch` sequences of `context` tokens."""
    times = [seconds for seconds, _ in decode_steps(model, batch, context, steps + 3, graphed)]
    return statistics.median(times[3:])
