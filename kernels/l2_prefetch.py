"""The next projections' weights pulled into L2 while a kernel that leaves HBM idle runs.

At batch-1 decode a layer's attention reads ~1 MB of keys and values and takes ~9 us
(docs/benchmarks/gpu.md, runs 136-143): HBM idles while the o projection's weights (8.4
MB packed int4, 33.5 MB bf16 on the 8B shape) wait for the GEMV after it, which then pays
a DRAM round trip at every wave. Here the attention kernel's programs, before they wait
for their inputs (`kernels.pdl`: weights are never written by an earlier kernel), issue
bulk prefetches (``cp.async.bulk.prefetch.L2``, sm_90+) of the next products' leading
bytes, up to a budget: the GEMV then reads what arrived from L2. The norm and SwiGLU
kernels before a product (`kernels.triton_fused`) do the same for its weights: with PDL
they launch during the last wave of the GEMV before them, whose tail leaves HBM part idle.
A prefetch is a hint with no result, so the step's outputs are the same with it or
without (`tests/gpu/test_gpu_decode_steps.py`).

`regions` picks the byte ranges, `prefetch_args` turns them into a kernel's launch
arguments and `prefetch_l2` (inside the kernel) issues them; `disabled` and `budget`
serve side-by-side timing. `LEAPFROG_L2_PREFETCH_MB` sets the budget (0, the default: off).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence

import torch
import triton
import triton.language as tl

from kernels.switch import Switch

SLOTS = 4
"""Byte ranges one launch may prefetch (an int4 weight is three tensors)."""
CHUNK = tl.constexpr(4096)
"""Bytes one prefetch instruction asks for."""
ENABLED = Switch(True)
"""Whether kernels prefetch where the device supports it (benchmarks toggle it)."""
disabled = ENABLED.off
"""Launch (and capture) without prefetches inside the block, for side-by-side timing."""
POINTWISE = Switch(True)
"""Whether the norm and SwiGLU kernels before a product prefetch its weights too (the
attention kernel alone, off)."""
pointwise_disabled = POINTWISE.off
BUDGET = int(float(os.environ.get("LEAPFROG_L2_PREFETCH_MB", "0")) * 2**20)
"""Bytes a launch prefetches at most; 0 (the default until it is timed on a device, gpu.md
session 40): none."""


@contextlib.contextmanager
def budget(nbytes: int) -> Iterator[None]:
    """Prefetch at most `nbytes` a launch inside the block (benchmarks sweep it)."""
    global BUDGET
    before, BUDGET = BUDGET, nbytes
    try:
        yield
    finally:
        BUDGET = before


@functools.cache
def _capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def supported(device: torch.device) -> bool:
    """The bulk prefetch runs on `device`: CUDA sm_90+, not under TRITON_INTERPRET (no PTX
    there)."""
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and _capable(device))


def active(device: torch.device) -> bool:
    """Prefetch on `device`: `supported`, `ENABLED`, a budget above zero."""
    return ENABLED.on and BUDGET > 0 and supported(device)


def regions(tensors: Sequence[torch.Tensor], limit: int) -> list[tuple[torch.Tensor, int]]:
    """The leading bytes of `tensors`, in order, up to `limit` bytes in all and `SLOTS`
    ranges, each a multiple of 16 bytes (the bulk prefetch's unit) from a 16-byte aligned
    start; a tensor that is not contiguous and so aligned ends the list (its bytes from
    its start need not be its own)."""
    out = []
    for t in tensors[:SLOTS]:
        take = min(t.numel() * t.element_size(), limit) // 16 * 16
        if take <= 0 or not t.is_contiguous() or t.data_ptr() % 16:
            break
        out.append((t, take))
        limit -= take
    return out


def prefetch_args(like: torch.Tensor, tensors: Sequence[torch.Tensor],
                  pointwise: bool = False) -> dict:
    """A launch's prefetch keywords (``pf0``..``pf3``, their byte counts ``pn0``..``pn3``
    and the ``PREFETCH`` constexpr) for the leading bytes of `tensors` within the budget;
    nothing to prefetch where `active` is off for `like`'s device (or `POINTWISE` for a
    `pointwise` kernel's launch) or `tensors` is empty (`like` then fills the unused
    pointers)."""
    on = active(like.device) and (POINTWISE.on or not pointwise)
    picked = regions(tensors, BUDGET) if on else []
    args: dict = {"PREFETCH": bool(picked)}
    for i in range(SLOTS):
        t, n = picked[i] if i < len(picked) else (like, 0)
        args[f"pf{i}"], args[f"pn{i}"] = t, n
    return args


@triton.jit
def _prefetch_range(ptr, nbytes, program, programs, LANES: tl.constexpr):
    """This program's share of [ptr, ptr + nbytes): chunks program, program + programs, ...
    of CHUNK bytes, LANES at a time (one a thread)."""
    base = ptr.to(tl.pointer_type(tl.int8), bitcast=True)
    lane = tl.arange(0, LANES).to(tl.int64)
    step = programs.to(tl.int64) * LANES * CHUNK
    for start in range(program.to(tl.int64) * LANES * CHUNK, nbytes, step):
        off = start + lane * CHUNK
        size = (tl.minimum(nbytes - off, CHUNK) // 16 * 16).to(tl.int32)
        live = size > 0  # (lanes past the end ask for the first 16 bytes again)
        tl.inline_asm_elementwise(
            "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
            [base + tl.where(live, off, 0), tl.where(live, size, 16)], dtype=tl.int32,
            is_pure=False, pack=1)


@triton.jit
def prefetch_l2(pf0, pn0, pf1, pn1, pf2, pn2, pf3, pn3, LANES: tl.constexpr):
    """Issue this program's share of the launch's prefetches (`prefetch_args`), spread
    over every program of the grid; call it before `kernels.pdl.await_inputs`."""
    program = (tl.program_id(0) + tl.num_programs(0)
               * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2)))
    programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    _prefetch_range(pf0, pn0, program, programs, LANES)
    _prefetch_range(pf1, pn1, program, programs, LANES)
    _prefetch_range(pf2, pn2, program, programs, LANES)
    _prefetch_range(pf3, pn3, program, programs, LANES)
