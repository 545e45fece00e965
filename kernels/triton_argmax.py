"""Greedy next tokens: the argmax of each row of the logits, in one Triton launch on CUDA.

`greedy_tokens` is what the engine calls after the LM head (also inside its CUDA graphs);
it gives exactly ``torch.argmax(logits, dim=-1)``: the lowest index among equal maxima, and
as torch treats NaN as larger than everything, the first NaN of a row wherever a row has
one. On CPU (and any device but CUDA) it is torch's argmax.

A row of 128K float32 logits is too little work to spread well over the device, and
torch's reduction took 27-37 us for it on an H200 (1.5% of an 8B decode step). The kernel's grid is (rows, slices): each
program loads its slice of a row (BLOCK elements, one load of 4 warps), reduces it
in registers to (value, first index), stores that partial, and bumps its row's counter
(acq_rel); the last program of the row to arrive merges the row's partials in slice order
and writes the token, then resets the counter to zero (the shared split-K counters of
`kernels.triton_gemv`). So a call is one launch, with no host sync and no memset, and can
be captured in a CUDA graph. A vocabulary is split into at most 128 slices of a power of
two >= 1024 elements (`slice_width`): 126 slices of 1024 for Llama 3's 128256, 75 of 2048
for 151936, one for 1024 or fewer; a single slice writes its token without the counter.

Nothing is read before `kernels.pdl.await_inputs`: the logits are the previous kernel's
output. `triton_argmax` is the launch itself, on any device (CPU under TRITON_INTERPRET=1,
which the tests use), with an optional slice width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import await_inputs, pdl_args
from kernels.triton_gemv import _tile_counters

MAX_SLICES = 128
MIN_BLOCK = 1024
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _best(x, idx, live):
    """(value, index) that torch.argmax picks among the live entries of float32 x with
    indices idx: the first NaN if there is one (its value NaN), else the maximum at its
    lowest index. A slice's partial is its best; the best of the partials is the row's."""
    BIG: tl.constexpr = 2147483647
    nan_at = tl.min(tl.where(live & (x != x), idx, BIG), axis=0)
    x = tl.where(live & (x == x), x, float("-inf"))
    top = tl.max(x, axis=0)
    top_at = tl.min(tl.where(live & (x == top), idx, BIG), axis=0)
    has_nan = nan_at < BIG
    return tl.where(has_nan, float("nan"), top), tl.where(has_nan, nan_at, top_at)


@triton.jit
def _argmax_kernel(logits_ptr, out_ptr, part_val_ptr, part_idx_ptr, cnt_ptr, n_cols, stride,
                   slices, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, SPLIT: tl.constexpr,
                   PDL: tl.constexpr):
    await_inputs(PDL)  # the logits are the previous kernel's output
    row = tl.program_id(0)
    part = tl.program_id(1)
    cols = part * BLOCK + tl.arange(0, BLOCK)
    live = cols < n_cols
    x = tl.load(logits_ptr + row.to(tl.int64) * stride + cols, mask=live, other=0.0)
    value, index = _best(x.to(tl.float32), cols, live)
    if not SPLIT:
        tl.store(out_ptr + row, index.to(tl.int64))
    else:
        tl.store(part_val_ptr + row * slices + part, value)
        tl.store(part_idx_ptr + row * slices + part, index)
        tl.debug_barrier()
        counter = cnt_ptr + row
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == slices - 1:  # the row's last program: merge in slice order
            s = tl.arange(0, BLOCK_P)
            mask = s < slices
            vals = tl.load(part_val_ptr + row * slices + s, mask=mask, other=0.0,
                           cache_modifier=".cg")
            idxs = tl.load(part_idx_ptr + row * slices + s, mask=mask, other=0,
                           cache_modifier=".cg")
            _, index = _best(vals, idxs, mask)
            tl.store(out_ptr + row, index.to(tl.int64))
            tl.atomic_xchg(counter, 0)


def slice_width(vocab: int) -> int:
    """Elements per program: a power of two >= MIN_BLOCK, <= MAX_SLICES slices a row."""
    return max(MIN_BLOCK, triton.next_power_of_2(triton.cdiv(vocab, MAX_SLICES)))


def triton_argmax(logits: torch.Tensor, out: torch.Tensor | None = None,
                  block: int | None = None) -> torch.Tensor:
    """The kernel on logits [rows, vocab] -> int64 [rows] (into `out` if given), on any
    device Triton runs on; `block` (a power of two) overrides `slice_width`."""
    if logits.dim() != 2 or logits.dtype not in DTYPES:
        raise ValueError(f"logits must be 2-D float32/bfloat16/float16, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError("argmax of an empty vocabulary")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    block = block or slice_width(vocab)
    slices = triton.cdiv(vocab, block)
    part_val = torch.empty(rows * slices, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(rows * slices, dtype=torch.int32, device=logits.device)
    _argmax_kernel[(rows, slices)](
        logits, out, part_val, part_idx, _tile_counters(logits.device, rows), vocab,
        logits.stride(0), slices, BLOCK=block, BLOCK_P=triton.next_power_of_2(slices),
        SPLIT=slices > 1, **pdl_args(logits.device), num_warps=4, num_stages=1)
    return out


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of logits [rows, vocab] -> int64 [rows]: the Triton kernel
    on CUDA (one launch, capturable), torch elsewhere."""
    if logits.is_cuda:
        return triton_argmax(logits)
    return logits.argmax(dim=-1)
