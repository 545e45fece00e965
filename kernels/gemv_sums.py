"""The tensor-core GEMV handing its unrounded sums to the next kernel (batch-1 decode).

`mma_gemv_sums` runs the kernel of `kernels.triton_mma_gemv` with SUMS: instead of storing
split-K partials and merging them, every program adds its float32 sums in fixed point
(int64, `kernels.triton_fused.FIXED_ONE`) into one zeroed device buffer, and the fused
pointwise kernel that takes the `GemvSums` (norm, RoPE + KV write, SwiGLU) rounds them and
zeroes the buffer. `Linear.project` (`server.models.layers`) chooses it where
`mma_gemv_sums_supported`; `sums_disabled` turns it off for side-by-side timing.
"""

from __future__ import annotations

import os

import torch

from kernels.quant import PackedWeight
from kernels.switch import Switch
from kernels.triton_fused import GemvSums
from kernels.triton_gemv import _outgrown
from kernels.triton_mma_gemv import GROUP_ROWS, launch, mma_gemv_supported

_sums: dict[torch.device, torch.Tensor] = {}
SUMS_ENABLED = Switch(os.environ.get("LEAPFROG_GEMV_SUMS", "1") != "0")
"""Whether the decoder layers take `mma_gemv_sums` where it serves (benchmarks toggle it)."""
sums_disabled = SUMS_ENABLED.off
"""The decoder layers' GEMVs merge their own split-K partials inside the block (for
side-by-side comparisons)."""


def mma_gemv_sums_supported(x: torch.Tensor, packed: PackedWeight) -> bool:
    """Whether `mma_gemv_sums` serves this product (and `SUMS_ENABLED`)."""
    return SUMS_ENABLED.on and x.shape[0] <= GROUP_ROWS and mma_gemv_supported(x, packed)


def mma_gemv_sums(x: torch.Tensor, packed: PackedWeight,
                  config: dict | None = None) -> GemvSums:
    """`mma_gemv` of 1..4 rows whose programs add their sums into a zeroed int64 buffer
    (`kernels.triton_fused.GemvSums`) instead of merging split-K partials: the merge's
    round trips (~2 us a launch on an H200, docs/benchmarks/gpu.md run 61) move into the
    next fused kernel, which reads the sums anyway. One buffer serves the device: each
    GemvSums must be consumed before the next is made (they are, in the decoder layer's
    chain of kernels on one stream)."""
    m, n = x.shape[0], packed.out_features
    if m > GROUP_ROWS:
        raise ValueError(f"GemvSums serve up to {GROUP_ROWS} rows, got {m}")
    buf = _sums.get(x.device)
    if buf is None or buf.numel() < m * n:
        if buf is not None:
            _outgrown.append(buf)
        with torch.inference_mode(False):  # a normal tensor even when made in the engine's
            # inference mode: the autotuner restores it with copy_, refused outside that mode
            buf = torch.zeros(max(m * n, 1 << 16), dtype=torch.int64, device=x.device)
        _sums[x.device] = buf
    sums = buf[: m * n].view(m, n)
    launch(x, packed, None, sums, 1, config, True)
    return GemvSums(sums, x.dtype)
