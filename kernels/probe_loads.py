"""Loads-only ceiling of the int4 mma GEMV's access pattern (a probe, CUDA only).

`python3 -m kernels.probe_loads` times kernels that only read the packed words of an
M = 1 W4A16 product the way `kernels.triton_mma_gemv` does (32 output features a warp-rep,
4 word rows a step, split-K) and XOR them together, next to the same reads from a layout
in which each 32-feature strip's words are contiguous over all of K, and next to the same
words fetched by the Hopper tensor-memory accelerator (TMA: one thread asks for a [ROWS,
BLOCK_N] box, which lands in shared memory, several boxes in flight through Triton's
pipeliner) instead of by every lane into registers. What the fastest of these reaches is
what the GEMV could reach if its arithmetic hid completely behind its loads
(docs/benchmarks/gpu.md, runs 12-21 and 60-61).
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from kernels.bench_gpu import _graph_time, copy_bandwidth
from kernels.triton_gemv import _reduce_partials, _tile_counters


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _strided_walk(w_ptr, N, K8, BLOCK_N: tl.constexpr, STEPS: tl.constexpr,
                  SPLIT: tl.constexpr):
    """The XOR of this program's words, read as the GEMV reads the ``words`` layout [K / 8,
    N]: element e is lane (e // 4) % 32's word e % 4 of row q = (e // 4) % 4 of each step."""
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
    return acc


@triton.jit
def _strided(w_ptr, out_ptr, N, K8, BLOCK_N: tl.constexpr, STEPS: tl.constexpr,
             SPLIT: tl.constexpr):
    """The ``words`` layout [K / 8, N] as the GEMV reads it."""
    acc = _strided_walk(w_ptr, N, K8, BLOCK_N, STEPS, SPLIT)
    e = tl.arange(0, BLOCK_N * 4)
    tl.store(out_ptr + tl.program_id(1) * N * 4 + tl.program_id(0) * BLOCK_N * 4 + e, acc)


@triton.jit
def _strided_merge(w_ptr, out_ptr, part_ptr, cnt_ptr, N, K8, BLOCK_N: tl.constexpr,
                   STEPS: tl.constexpr, SPLIT: tl.constexpr):
    """`_strided`, then the GEMVs' split-K merge (`kernels.triton_gemv._reduce_partials`)
    of one float32 partial a feature: what the merge adds to a launch."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    acc = _strided_walk(w_ptr, N, K8, BLOCK_N, STEPS, SPLIT)
    folded = tl.reduce(tl.reshape(acc, (BLOCK_N // 4, 4, 4)), 1, _xor)  # over q
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(part_ptr + pid_k * N + offs, tl.reshape(folded, (BLOCK_N,)).to(tl.float32))
    _reduce_partials(out_ptr, part_ptr, cnt_ptr, offs, offs < N, N, 1, N, pid_n, SPLIT)


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


@triton.jit
def _tma(w_desc, out_ptr, N, K8, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
         SPLIT: tl.constexpr, STAGES: tl.constexpr):
    """The ``words`` layout [K / 8, N] in [ROWS, BLOCK_N] boxes through a TMA descriptor."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = K8 // SPLIT
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.int32)
    for r in tl.range(pid_k * rows, pid_k * rows + rows, ROWS, num_stages=STAGES):
        acc ^= w_desc.load([r, pid_n * BLOCK_N])
    tl.store(out_ptr + pid_k * N + pid_n * BLOCK_N + tl.arange(0, BLOCK_N),
             tl.reduce(acc, 0, _xor))


def _time_tma(copies: list[torch.Tensor], n: int, k8: int, block_n: int, rows: int,
              warps: int, split: int, stages: int) -> float:
    from triton.tools.tensor_descriptor import TensorDescriptor

    out = torch.empty(split * n, dtype=torch.int32, device="cuda")
    descs = {w.data_ptr(): TensorDescriptor.from_tensor(w, [rows, block_n]) for w in copies}

    def op(_, w: torch.Tensor) -> None:
        _tma[(n // block_n, split)](descs[w.data_ptr()], out, n, k8, BLOCK_N=block_n,
                                    ROWS=rows, SPLIT=split, STAGES=stages, num_warps=warps)
    return _graph_time(op, None, copies)


def _time(kernel, copies: list[torch.Tensor], n: int, k8: int, block_n: int, warps: int,
          split: int, steps: int) -> float:
    """Seconds per launch over the weight copies (see `kernels.bench_gpu._graph_time`)."""
    out = torch.empty(split * n * 4, dtype=torch.int32, device="cuda")

    def op(_, w: torch.Tensor) -> None:
        kernel[(n // block_n, split)](w, out, n, k8, BLOCK_N=block_n, STEPS=steps,
                                      SPLIT=split, num_warps=warps)
    return _graph_time(op, None, copies)


def _time_merge(copies: list[torch.Tensor], n: int, k8: int, block_n: int, warps: int,
                split: int, steps: int) -> float:
    out = torch.empty(n, dtype=torch.float32, device="cuda")
    part = torch.empty(split * n, dtype=torch.float32, device="cuda")
    counters = _tile_counters(out.device, n // block_n)

    def op(_, w: torch.Tensor) -> None:
        _strided_merge[(n // block_n, split)](w, out, part, counters, n, k8, BLOCK_N=block_n,
                                              STEPS=steps, SPLIT=split, num_warps=warps)
    return _graph_time(op, None, copies)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="*", default=["tma", "strided", "contiguous"],
                        choices=["tma", "strided", "contiguous"],
                        help="the read patterns to time (strided also with the merge)")
    kinds = parser.parse_args(argv).kinds
    if not torch.cuda.is_available():
        raise SystemExit("kernels.probe_loads needs a CUDA device")
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
    for n, k in ((14336, 4096), (4096, 14336), (6144, 4096), (4096, 4096)):
        k8 = k // 8
        w = torch.randint(-2**31, 2**31 - 1, (k8, n), dtype=torch.int32, device="cuda")
        copies = [w.clone() for _ in range(max(8, 240 * 2**20 // w.nbytes))]  # past L2
        best: dict[str, float] = {}
        boxes = ((32, 64, 1), (64, 64, 2), (128, 64, 4), (128, 32, 4)) if "tma" in kinds else ()
        for block_n, rows, warps in boxes:  # BLOCK_N x ROWS boxes, warps
            for split in (1, 2, 4, 8):
                for stages in (3, 5):
                    programs = n // block_n * split
                    if (k8 % (split * rows) or not 132 <= programs <= 4096
                            or k8 // (split * rows) < stages - 1):
                        continue
                    seconds = _time_tma(copies, n, k8, block_n, rows, warps, split, stages)
                    best["tma"] = min(best.get("tma", 1.0), seconds)
                    print(f"{n}x{k} tma {block_n}x{rows}/{warps}w s{split} st{stages}: "
                          f"{seconds * 1e6:.2f} us {100 * w.nbytes / seconds / bandwidth:.0f}%",
                          flush=True)
        for name, kernel in (("strided", _strided), ("contiguous", _contiguous)):
            if name not in kinds:
                continue
            for block_n, warps in ((32, 1), (64, 1), (128, 4)):
                for split in (4, 16):
                    for steps in (4, 8):
                        programs = n // block_n * split
                        if (k8 // 4) % (split * steps) or not 132 <= programs <= 8192:
                            continue
                        seconds = _time(kernel, copies, n, k8, block_n, warps, split,
                                        steps)
                        best[name] = min(best.get(name, 1.0), seconds)
                        print(f"{n}x{k} {name} {block_n}/{warps}w s{split} steps{steps}: "
                              f"{seconds * 1e6:.2f} us {100 * w.nbytes / seconds / bandwidth:.0f}%",
                              flush=True)
            if name == "strided":  # the same launches with the split-K merge
                for block_n, warps in ((32, 1), (64, 1)):
                    for split in (4, 16):
                        seconds = _time_merge(copies, n, k8, block_n, warps, split, 8)
                        print(f"{n}x{k} strided+merge {block_n}/{warps}w s{split} steps8: "
                              f"{seconds * 1e6:.2f} us "
                              f"{100 * w.nbytes / seconds / bandwidth:.0f}%", flush=True)
        print(f"{n}x{k} best: " + ", ".join(
            f"{name} {t * 1e6:.2f} us ({100 * w.nbytes / t / bandwidth:.0f}%)"
            for name, t in best.items()), flush=True)


if __name__ == "__main__":
    main()
