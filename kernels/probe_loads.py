"""Loads-only ceiling of the int4 mma GEMV's access pattern (a probe, CUDA only).

`python3 -m kernels.probe_loads` times kernels that only read the packed words of an
M = 1 W4A16 product the way `kernels.triton_mma_gemv` does (32 output features a warp-rep,
4 word rows a step, split-K) and XOR them together, next to the same reads from a layout
in which each 32-feature strip's words are contiguous over all of K. What the fastest of
these reaches is what the GEMV could reach if its arithmetic hid completely behind its
loads (docs/benchmarks/gpu.md, runs 12-21).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.bench_gpu import _graph_time, copy_bandwidth


@triton.jit
def _strided(w_ptr, out_ptr, N, K8, BLOCK_N: tl.constexpr, STEPS: tl.constexpr,
             SPLIT: tl.constexpr):
    """The ``words`` layout [K / 8, N] as the GEMV reads it."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    e = tl.arange(0, BLOCK_N * 4)
    q = (e // 4) % 4
    n = pid_n * BLOCK_N + (e // 16) * 4 + e % 4
    rows = K8 // SPLIT
    acc = tl.zeros((BLOCK_N * 4,), dtype=tl.int32)
    for r in range(pid_k * rows, pid_k * rows + rows, 4 * STEPS):
        for i in tl.static_range(STEPS):
            acc ^= tl.load(w_ptr + (r + 4 * i + q) * N + n)
    tl.store(out_ptr + pid_k * N * 4 + pid_n * BLOCK_N * 4 + e, acc)


@triton.jit
def _contiguous(w_ptr, out_ptr, N, K8, BLOCK_N: tl.constexpr, STEPS: tl.constexpr,
                SPLIT: tl.constexpr):
    """A [N / 32, K / 32, 128 words] layout: one strip's words for all of K in a row."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    e = tl.arange(0, BLOCK_N * 4)
    strip = pid_n * (BLOCK_N // 32) + e // 128
    steps = K8 // 4
    per = steps // SPLIT
    acc = tl.zeros((BLOCK_N * 4,), dtype=tl.int32)
    for st in range(pid_k * per, pid_k * per + per, STEPS):
        for i in tl.static_range(STEPS):
            acc ^= tl.load(w_ptr + (strip * steps + st + i) * 128 + e % 128)
    tl.store(out_ptr + pid_k * N * 4 + pid_n * BLOCK_N * 4 + e, acc)


def _time(kernel, copies: list[torch.Tensor], n: int, k8: int, block_n: int, warps: int,
          split: int, steps: int) -> float:
    """Seconds per launch over the weight copies (see `kernels.bench_gpu._graph_time`)."""
    out = torch.empty(split * n * 4, dtype=torch.int32, device="cuda")

    def op(_, w: torch.Tensor) -> None:
        kernel[(n // block_n, split)](w, out, n, k8, BLOCK_N=block_n, STEPS=steps,
                                      SPLIT=split, num_warps=warps)
    return _graph_time(op, None, copies)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("kernels.probe_loads needs a CUDA device")
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
    for n, k in ((14336, 4096), (4096, 14336), (4096, 4096)):
        k8 = k // 8
        w = torch.randint(-2**31, 2**31 - 1, (k8, n), dtype=torch.int32, device="cuda")
        copies = [w.clone() for _ in range(8)]  # 8 x 29 MB: past the 60 MB L2
        for name, kernel in (("strided", _strided), ("contiguous", _contiguous)):
            for block_n, warps in ((32, 1), (64, 1), (128, 4), (256, 4)):
                for split in (1, 4, 16):
                    for steps in (4, 8):
                        programs = n // block_n * split
                        if (k8 // 4) % (split * steps) or not 132 <= programs <= 8192:
                            continue
                        seconds = _time(kernel, copies, n, k8, block_n, warps, split,
                                        steps)
                        print(f"{n}x{k} {name} {block_n}/{warps}w s{split} steps{steps}: "
                              f"{seconds * 1e6:.2f} us {100 * w.nbytes / seconds / bandwidth:.0f}%",
                              flush=True)


if __name__ == "__main__":
    main()
