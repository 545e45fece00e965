"""The Gumbel race's scores (`kernels.sampling`) in one Triton launch: on CUDA, torch's
version is a dozen int64 and float64 operations over [rows, vocab], each its own launch.
Grid (rows, slices of BLOCK tokens); every element computes its SplitMix64 number and its
noise in registers, as the reference does, and stores its float32 score."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import await_inputs, pdl_args
from kernels.sampling import GAMMA, MIX1, MIX2

BLOCK = 1024


@triton.jit
def _race_kernel(x_ptr, t_ptr, seed_ptr, pos_ptr, out_ptr, n_cols, stride_x, stride_o,
                 GAMMA: tl.constexpr, MIX1: tl.constexpr, MIX2: tl.constexpr,
                 BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < n_cols
    await_inputs(PDL)  # x is the previous kernel's output
    seed = tl.load(seed_ptr + row).to(tl.uint64, bitcast=True)
    pos = tl.load(pos_ptr + row).to(tl.uint64, bitcast=True)
    z = seed * MIX1 + pos * MIX2 + (cols + 1).to(tl.uint64) * GAMMA
    z = (z ^ (z >> 30)) * MIX1
    z = (z ^ (z >> 27)) * MIX2
    z = z ^ (z >> 31)
    u = ((z >> 11).to(tl.float64) + 0.5) * 1.1102230246251565e-16  # 2^-53
    noise = -tl.log(-tl.log(u))
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=live, other=0.0)
    scaled = tl.math.div_rn(x, tl.load(t_ptr + row))
    tl.store(out_ptr + row.to(tl.int64) * stride_o + cols,
             (scaled.to(tl.float64) + noise).to(tl.float32), mask=live)


def race_scores(x: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
    """`kernels.sampling.race_scores_reference` of x [R, V] float32 (any device Triton runs
    on: CPU under TRITON_INTERPRET=1)."""
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"x must be 2-D float32, got {x.dtype} {tuple(x.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    rows, vocab = x.shape
    out = torch.empty_like(x)
    if rows and vocab:
        _race_kernel[(rows, triton.cdiv(vocab, BLOCK))](
            x, temperature.float().contiguous(), seeds.contiguous(), positions.contiguous(),
            out, vocab, x.stride(0), out.stride(0), GAMMA=GAMMA, MIX1=MIX1, MIX2=MIX2,
            BLOCK=BLOCK, **pdl_args(x.device), num_warps=4, num_stages=1)
    return out
