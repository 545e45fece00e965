"""Decode attention on CUDA: `paged_attention_triton` by tile size and split count.

`python3 -m kernels.bench_attention [--json OUT]` times one query token a sequence (decode)
for the default model's attention shape (9 heads, 3 KV heads, dim 64) and Llama-3-8B's (32,
8, 128) at batch 1 and 16 and several contexts, for every (BLOCK_KV, splits) in the grid,
against the launch's default choice. A CUDA graph holds one launch a layer of each model
(30 and 32), each over its own KV cache as in a forward, so caches are not read from L2;
the time is the replay's (median of 15) over the launches.
"""

from __future__ import annotations

import argparse
import json

import torch

from kernels.bench_gpu import _time_events
from kernels.triton_attention import paged_attention_triton

SHAPES = {"smol": (9, 3, 64, 30), "8b": (32, 8, 128, 32)}  # heads, kv heads, dim, layers
BLOCK = 16


def _inputs(shape: str, batch: int, context: int) -> tuple:
    """A query a sequence, and a KV cache a layer holding `context` positions of each."""
    heads, kv_heads, dim, layers = SHAPES[shape]
    per_seq = -(-context // BLOCK)
    caches = [tuple(torch.randn(batch * per_seq, BLOCK, kv_heads, dim, device="cuda",
                                dtype=torch.bfloat16) for _ in range(2))
              for _ in range(layers)]
    tables = torch.arange(batch * per_seq, device="cuda", dtype=torch.int32).view(batch, -1)
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    qsl = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
    return q, caches, tables, lens, qsl


def _time(inputs: tuple, splits: int | None, block_kv: int | None) -> float:
    """Seconds a launch, over one graph of a launch a layer."""
    q, caches, tables, lens, qsl = inputs
    out = torch.empty_like(q)

    def run() -> None:
        for k, v in caches:
            paged_attention_triton(q, k, v, tables, lens, qsl, q.shape[-1] ** -0.5, out=out,
                                   splits=splits, block_kv=block_kv)

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return _time_events(graph.replay, 15) / len(caches)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--contexts", type=int, nargs="*", default=[256, 1024, 4096])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--block-kv", type=int, nargs="*", default=[32, 64, 128])
    parser.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32])
    args = parser.parse_args(argv)
    rows = []
    for shape in SHAPES:
        for batch in args.batches:
            for context in args.contexts:
                inputs = _inputs(shape, batch, context)
                default = _time(inputs, None, None)
                timed = {(b, s): _time(inputs, s, b) for b in args.block_kv for s in args.splits}
                del inputs
                (b, s), best = min(timed.items(), key=lambda kv: kv[1])
                print(f"{shape:4} b={batch:<3} ctx={context:<5} default {default * 1e6:6.2f} us"
                      f"  best {best * 1e6:6.2f} (block_kv {b}, splits {s})  "
                      + " ".join(f"{bk}/{sp}:{t * 1e6:.2f}" for (bk, sp), t in timed.items()),
                      flush=True)
                rows.append(dict(shape=shape, batch=batch, context=context,
                                 default_us=default * 1e6,
                                 us={f"{bk}/{sp}": t * 1e6 for (bk, sp), t in timed.items()}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
