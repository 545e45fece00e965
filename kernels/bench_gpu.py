"""GPU kernel benchmark: W4A16 / W8A16 GEMMs of Llama-3-8B shapes against torch's bf16 matmul.

Run on a CUDA machine: `python3 -m kernels.bench_gpu --json OUT.json`. Kernels: ``bf16``
torch's matmul (cuBLAS), ``bf16-tr`` our 16-bit GEMV (M <= 16), ``w4a16`` / ``w8a16`` our
packed kernels as the model calls them (the mma GEMV for int4 at M <= 16 and for per-channel
int8 at M <= 8), ``w4-fma`` / ``w8-fma`` the CUDA-core GEMV (M = 1 only), ``w4-nopdl`` /
``tr-nopdl`` the w4a16 / bf16-tr kernels launched without programmatic dependent launch
(`kernels.pdl`; M = 1 only), ``w4-sums`` the int4 GEMV as the decoder layers run it at
M <= 4 (`kernels.gemv_sums`: no split-K merge of its own; its programs add their sums into
one int64 buffer that the next kernel, a norm, RoPE or SwiGLU that runs anyway, rounds and
zeroes), ``w4-tc`` and ``w4-deq`` the two int4 routes above 16 rows
(the tensor-core GEMM; dequantizing for cuBLAS), whichever `kernels.triton_gemm.DEQUANT_ROWS`
picks (`--rows` sets the M values); "x bf16" is against cuBLAS. It measures the device's copy
bandwidth in the same run (a large device-to-device copy, bytes read plus written), then for
every shape and M times each GEMM as the replay of one CUDA graph that runs it over enough
distinct weight copies to overflow the L2 cache, so the numbers are the steady state of
back-to-back kernels reading weights from HBM. Achieved bytes/s count the packed weight,
scales/offsets, activations and outputs once each.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable

import torch

from kernels import pdl
from kernels.gemm import quantized_linear
from kernels.gemv_sums import mma_gemv_sums, mma_gemv_sums_supported
from kernels.quant import PackedWeight, quantize_int4, quantize_int8, to_words
from kernels.triton_dense_gemv import ROWS_MAX, dense_gemv

SHAPES = {  # name: (N, K) = (out_features, in_features)
    "qo 4096x4096": (4096, 4096),
    "kv 1024x4096": (1024, 4096),
    "gate/up 14336x4096": (14336, 4096),
    "down 4096x14336": (4096, 14336),
}
FUSED_SHAPES = {  # Llama-3-8B's projections as its decoder layers run them, fused (by name)
    "qkv 6144x4096": (6144, 4096),
    "gate_up 28672x4096": (28672, 4096),
}
SMOL_SHAPES = {  # the default model's (SmolLM2-135M), by name only (--shapes smol-...)
    "smol-qkv 960x576": (960, 576),
    "smol-gate/up 3072x576": (3072, 576),
    "smol-down 576x1536": (576, 1536),
    "smol-head 49152x576": (49152, 576),
}
MS = (1, 4, 8, 12, 16, 64)
L2_BYTES = 60 * 2**20


def _time_events(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of `fn` over `reps` event-timed runs (after two warm-ups)."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 4 * 2**30) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = _time_events(lambda: dst.copy_(src), 20)
    return 2 * nbytes / seconds


def _graph_time(op: Callable[[torch.Tensor, object], torch.Tensor], x: torch.Tensor,
                weights: list) -> float:
    """Seconds per GEMM: one CUDA graph runs `op` over every weight copy; median of replays."""
    for w in weights[:2]:
        op(x, w)  # compile / autotune outside the graph
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights:
            op(x, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            op(x, w)
    return _time_events(graph.replay, 15) / len(weights)


def _copies(nbytes: int) -> int:
    return max(2, min(128, math.ceil(3 * L2_BYTES / nbytes)))


def _fma_gemv(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    from kernels.triton_gemv import _tile_counters, triton_gemv

    out = torch.empty(1, packed.out_features, device=x.device, dtype=x.dtype)
    return triton_gemv(x, packed, out, _tile_counters(x.device, packed.out_features // 32))


def _sums_gemv(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """The GEMV's int64 sums (left in the device's buffer, as the layers leave them)."""
    return mma_gemv_sums(x, packed).sums


def _without_pdl(op: Callable) -> Callable:
    """`op` with every kernel launched (and captured) without PDL."""
    def run(x: torch.Tensor, w: object) -> torch.Tensor:
        with pdl.disabled():
            return op(x, w)
    return run


def _dequant_from(rows: int, op: Callable) -> Callable:
    """`op` with `kernels.triton_gemm.DEQUANT_ROWS` set to `rows` while it runs."""
    from kernels import triton_gemm

    def run(*args: object) -> torch.Tensor:
        saved, triton_gemm.DEQUANT_ROWS = triton_gemm.DEQUANT_ROWS, rows
        try:
            return op(*args)
        finally:
            triton_gemm.DEQUANT_ROWS = saved
    return run


def bench_shape(name: str, n: int, k: int, bandwidth: float, ms: tuple[int, ...] = MS
                ) -> list[dict]:
    """Rows of results for one weight shape at every M of `ms`."""
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    variants: dict[str, tuple[Callable, list, int]] = {}
    dense_copies = [w.clone() for _ in range(_copies(w.numel() * 2))]
    variants["bf16"] = (lambda x, wt: x @ wt.t(), dense_copies, w.numel() * 2)
    variants["bf16-tr"] = (dense_gemv, dense_copies, w.numel() * 2)  # our GEMV, M <= 16
    variants["tr-nopdl"] = (_without_pdl(dense_gemv), dense_copies, w.numel() * 2)
    group = 128 if k % 128 == 0 else 32  # (the default model's K = 576: GGUF's groups of 32)
    for scheme, make in (("w4a16", lambda: quantize_int4(w, group)),
                         ("w8a16", lambda: quantize_int8(w, None))):
        packed: PackedWeight = to_words(make())
        copies = [packed] + [packed.to("cuda") for _ in range(_copies(packed.nbytes()) - 1)]
        variants[scheme] = (quantized_linear, copies, packed.nbytes())
        # the CUDA-core GEMV that M = 1 used before the mma kernel
        variants[scheme[:2] + "-fma"] = (_fma_gemv, copies, packed.nbytes())
        if scheme == "w4a16":
            variants["w4-nopdl"] = (_without_pdl(quantized_linear), copies, packed.nbytes())
            variants["w4-sums"] = (_sums_gemv, copies, packed.nbytes())
            variants["w4-tc"] = (_dequant_from(1 << 30, quantized_linear), copies,
                                 packed.nbytes())
            variants["w4-deq"] = (_dequant_from(2, quantized_linear), copies, packed.nbytes())
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        act_bytes = (m * k + m * n) * 2
        base = None
        for scheme, (op, weights, wbytes) in variants.items():
            if scheme in ("tr-nopdl", "w4-fma", "w8-fma", "w4-nopdl") and m > 1:
                continue
            if scheme == "bf16-tr" and m > ROWS_MAX:
                continue
            if scheme in ("w4-tc", "w4-deq") and m <= 16:
                continue
            if scheme == "w4-sums" and not mma_gemv_sums_supported(x, weights[0]):
                continue
            seconds = _graph_time(op, x, weights)
            if scheme == "w4-sums":  # the timed runs added into the device's sums buffer:
                op(x, weights[0]).zero_()  # zero it, as the next kernel would
            base = seconds if scheme == "bf16" else base
            achieved = (wbytes + act_bytes) / seconds
            rows.append(dict(shape=name, N=n, K=k, M=m, kernel=scheme, us=seconds * 1e6,
                             gbps=achieved / 1e9, pct_copy_bw=100 * achieved / bandwidth,
                             speedup_vs_bf16=base / seconds))
        del x
    return rows


def sweep_gemv(name: str, n: int, k: int, bandwidth: float, m: int = 1) -> None:
    """Print the time of every configuration of the mma GEMV (the autotuner's candidates)
    at `m` rows for int4 and per-channel int8: the fastest 8, and the fastest with each
    number of warp rows along K (labels: BLOCK_N/warps/warp rows/split/rows a program)."""
    from kernels.triton_mma_gemv import _configs, mma_gemv, rows_fit

    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    for scheme, packed in (("w4a16", to_words(quantize_int4(w, 128))),
                           ("w8a16", to_words(quantize_int8(w, None)))):
        copies = [packed] + [packed.to("cuda") for _ in range(_copies(packed.nbytes()) - 1)]
        line = []
        for c in _configs():
            split, warps_k, rows = c.kwargs["split_k"], c.kwargs["WARPS_K"], c.kwargs["ROWS"]
            if split * warps_k * -(-n // c.kwargs["BLOCK_N"]) < 132:
                continue  # under one warp row an SM: never competitive
            if not rows_fit(c, m, scheme == "w8a16"):
                continue
            cfg = {"BLOCK_N": c.kwargs["BLOCK_N"], "split_k": split, "num_warps": c.num_warps,
                   "WARPS_K": warps_k, "ROWS": rows}

            def op(x_, p_, cfg=cfg):
                return mma_gemv(x_, p_, out, cfg)
            seconds = _graph_time(op, x, copies)
            pct = 100 * packed.nbytes() / seconds / bandwidth
            line.append((seconds, warps_k, f"{cfg['BLOCK_N']}/{c.num_warps}w/k{warps_k}"
                                           f"/s{split}/r{rows}:{seconds * 1e6:.1f}us({pct:.0f}%)"))
        line.sort()
        best = " ".join(text for _, _, text in line[:8])
        print(f"sweep {name} M={m} {scheme} (fastest 8 of {len(line)}): {best}", flush=True)
        rows = {}
        for _, warps_k, text in line:
            rows.setdefault(warps_k, text)
        print(f"sweep {name} M={m} {scheme} fastest by warp rows: {' '.join(rows.values())}",
              flush=True)


def print_table(rows: list[dict], bandwidth: float) -> None:
    print(f"\ncopy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
    print(f"{'shape':<20}{'M':>4} {'kernel':<9}{'us':>9}{'GB/s':>8}{'% copy':>8}{'x bf16':>8}")
    for r in rows:
        print(f"{r['shape']:<20}{r['M']:>4} {r['kernel']:<9}{r['us']:>9.2f}{r['gbps']:>8.0f}"
              f"{r['pct_copy_bw']:>8.1f}{r['speedup_vs_bf16']:>8.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write all rows and the copy bandwidth here")
    every = {**SHAPES, **FUSED_SHAPES, **SMOL_SHAPES}
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES),
                        choices=[*every, *(name.split()[0] for name in every)],
                        help="shapes by name or by its first word (qo, kv, gate/up, down; "
                        "the 8B layers' fused qkv, gate_up; the default model's smol-qkv, "
                        "smol-gate/up, smol-down, smol-head)")
    parser.add_argument("--sweep", action="store_true",
                        help="also time every mma GEMV configuration of each shape")
    parser.add_argument("--sweep-rows", type=int, nargs="*", default=[1],
                        help="the rows (M) the sweep times")
    parser.add_argument("--sweep-only", action="store_true", help="skip the kernel table")
    parser.add_argument("--rows", type=int, nargs="*", default=list(MS),
                        help="the rows (M) of the kernel table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels.bench_gpu needs a CUDA device")
    shapes = [name for name in every if name in args.shapes or name.split()[0] in args.shapes]
    bandwidth = copy_bandwidth()
    if args.sweep or args.sweep_only:
        for name in shapes:
            for m in args.sweep_rows:
                sweep_gemv(name, *every[name], bandwidth, m)
    if args.sweep_only:
        return
    rows = [row for name in shapes
            for row in bench_shape(name, *every[name], bandwidth, tuple(args.rows))]
    print_table(rows, bandwidth)
    tuned = tuned_configs()
    for entry in tuned:
        print("tuned", entry)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth,
                       "torch": torch.__version__, "rows": rows, "tuned": tuned}, f, indent=1)


def tuned_configs() -> list[dict]:
    """The configuration each autotuned GEMV/GEMM kernel picked in this process, per key:
    {"kernel", "key" (the tuner's key arguments by name), "config" (its parameters)}. The
    picks differ between processes (single timings a few percent apart), so benchmarks
    record them beside their figures."""
    from kernels.triton_dense_gemv import _dense_tuned, _rows_tuned
    from kernels.triton_gemm import _qgemm_tuned
    from kernels.triton_gemv import _gemv_tuned
    from kernels.triton_mma_gemv import _mma_tuned, _sums_tuned

    out = []
    for name, tuner in (("gemv", _gemv_tuned), ("dense_gemv", _dense_tuned),
                        ("dense_rows", _rows_tuned),
                        ("mma_gemv", _mma_tuned), ("mma_gemv_sums", _sums_tuned),
                        ("gemm", _qgemm_tuned)):
        for key, config in tuner.cache.items():  # (keys end with the arguments' dtypes)
            out.append({"kernel": name, "key": dict(zip(tuner.keys, key, strict=False)),
                        "config": config.all_kwargs()})
    return out


if __name__ == "__main__":
    main()
