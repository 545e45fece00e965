"""Decode attention on CUDA: `paged_attention_triton` by tile size and split count.

`python3 -m kernels.bench_attention [--json OUT]` times one query token a sequence (decode)
for the default model's attention shape (9 heads, 3 KV heads, dim 64) and Llama-3-8B's (32,
8, 128) at batch 1 and 16 and several contexts, for every (BLOCK_KV, splits) in the grid,
against the launch's default choice. A CUDA graph holds one launch a layer of each model
(30 and 32), each over its own KV cache as in a forward, so caches are not read from L2;
the time is the replay's (median of 15) over the launches.

`--floor` times what the kernel's time is made of instead (`floor_attention`: A the PDL
wait alone; B + loading the q rows and storing them; C + the block table, one tile of all
the context's keys and values a KV head, both dots and the softmax; D the kernel with one
split; E as launched), at `--contexts` (of at most 256 positions: C holds them all in one
tile).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from kernels.bench_gpu import _time_events
from kernels.pdl import await_inputs, pdl_args
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
    """Seconds a launch of `paged_attention_triton`, over one graph of a launch a layer."""
    return _time_launch(inputs, lambda q, k, v, tables, lens, qsl, out: paged_attention_triton(
        q, k, v, tables, lens, qsl, q.shape[-1] ** -0.5, out=out, splits=splits,
        block_kv=block_kv))


def _time_launch(inputs: tuple, launch: Callable[..., object]) -> float:
    """Seconds a `launch(q, k, v, tables, lens, qsl, out)`, over one graph of one a layer."""
    q, caches, tables, lens, qsl = inputs
    out = torch.empty_like(q)

    def run() -> None:
        for k, v in caches:
            launch(q, k, v, tables, lens, qsl, out)

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return _time_events(graph.replay, 15) / len(caches)


@triton.jit
def _floor_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, lens_ptr, stride_qt, stride_qh,
                  stride_kb, stride_ks, stride_kh, stride_bt, block_size, qk_scale,
                  GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_KV: tl.constexpr,
                  BLOCK_D: tl.constexpr, LEVEL: tl.constexpr, PDL: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(lens_ptr + seq)
    await_inputs(PDL)
    if LEVEL >= 1:
        r = tl.arange(0, ROWS)
        head_ok = r < GROUP
        d = tl.arange(0, BLOCK_D)
        rows = seq * stride_qt + (kv_head * GROUP + r)[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptr + rows, mask=head_ok[:, None], other=0.0)
        out = q.to(tl.float32)
        if LEVEL >= 2:
            t = tl.arange(0, BLOCK_KV)
            t_ok = t < seq_len
            page = tl.load(bt_ptr + seq * stride_bt + t // block_size, mask=t_ok,
                           other=0).to(tl.int64)
            at = (page[:, None] * stride_kb + (t % block_size)[:, None] * stride_ks
                  + kv_head * stride_kh + d[None, :])
            k = tl.load(k_ptr + at, mask=t_ok[:, None], other=0.0)
            v = tl.load(v_ptr + at, mask=t_ok[:, None], other=0.0)
            s = tl.where(t_ok[None, :], tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
            p = tl.exp2(s - tl.max(s, axis=1)[:, None])
            out = tl.dot(p.to(q.dtype), v) / tl.sum(p, axis=1)[:, None]
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty),
                 mask=head_ok[:, None])


def floor_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor,
                    block_kv: int, level: int) -> torch.Tensor:
    """The `--floor` stand-ins for decode attention (one query token a sequence, a program a
    (sequence, KV head)): level 0 only waits (PDL), 1 also copies q to `out`, 2 computes the
    attention over the first `block_kv` positions (at least the longest context) in one tile
    (in float32, with the probabilities rounded to q's dtype for the second dot)."""
    assert out.shape == q.shape and out.stride() == q.stride()
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    _floor_kernel[(q.shape[0], kv_heads)](
        q, k_cache, v_cache, out, block_tables, seq_lens, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        k_cache.shape[1], dim ** -0.5 * 1.4426950408889634, GROUP=group,
        ROWS=max(16, triton.next_power_of_2(group)), BLOCK_KV=block_kv, BLOCK_D=dim,
        LEVEL=level, num_warps=8 if dim > 64 else 4, **pdl_args(q.device))
    return out


def _floor_launch(block_kv: int, level: int) -> Callable[..., torch.Tensor]:
    """`floor_attention` at `level` as a `_time_launch` launch."""
    def launch(q, k, v, tables, lens, qsl, out):
        return floor_attention(q, k, v, tables, lens, out, block_kv, level)
    return launch


def _floor_rows(contexts: list[int], batches: list[int]) -> list[dict]:
    """`--floor`: us a launch of each stand-in and of the kernel (module docs)."""
    rows = []
    for shape in SHAPES:
        for batch in batches:
            for context in contexts:
                inputs = _inputs(shape, batch, context)
                tile = max(16, triton.next_power_of_2(context))
                times = {name: _time_launch(inputs, _floor_launch(tile, level))
                         for level, name in enumerate(("A wait", "B q", "C one tile"))}
                times["D kernel, 1 split"] = _time(inputs, 1, None)
                times["E kernel"] = _time(inputs, None, None)
                del inputs
                print(f"{shape:4} b={batch:<3} ctx={context:<5} "
                      + "  ".join(f"{n} {t * 1e6:5.2f}" for n, t in times.items()), flush=True)
                rows.append(dict(shape=shape, batch=batch, context=context,
                                 us={n: t * 1e6 for n, t in times.items()}))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--contexts", type=int, nargs="*", default=[256, 1024, 4096])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--block-kv", type=int, nargs="*", default=[32, 64, 128])
    parser.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--floor", action="store_true",
                        help="what the kernel's time is made of (module docs), contexts <= 256")
    args = parser.parse_args(argv)
    if args.floor:
        if max(args.contexts) > 256:
            parser.error("--floor takes contexts of at most 256 positions")
        rows = _floor_rows(args.contexts, args.batches)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
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
