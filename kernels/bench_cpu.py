"""Packed products on the CPU: the native kernel's variants against torch's packed kernels.

`python3 -m kernels.bench_cpu [--rows 1,9] [--weights 1] [--json OUT]` times
`quantized_linear` on the default model's shapes (q/k/v, o, gate/up, down, the tied head),
packed as GGUF stores them (Q4_1 for the layers, Q8_0 for the head), at each row count:
every native variant this CPU runs (`kernels.cpu_native.VARIANTS`), torch's packed kernels
(the native one turned off), and, for scale, float32 F.linear over the dequantized weight.
Microseconds a product, median of `--repeats` rounds of 10 calls, all in one process.

`--weights N` cycles through N distinct copies of each weight instead of one, so that from
a few copies on the weights no longer sit in cache, as in a model's forward. Set
``ATEN_CPU_CAPABILITY=avx2`` to time torch's kernels as a CPU without AVX-512 runs them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels import cpu_native
from kernels.gemm import quantized_linear
from kernels.quant import PackedWeight, dequantize, quantize_int4, quantize_int8

# (name, N, K, scheme): SmolLM2-135M's products
SHAPES = [("qkv", 960, 576, "int4"), ("o", 576, 576, "int4"), ("gate_up", 3072, 576, "int4"),
          ("down", 576, 1536, "int4"), ("head", 49152, 576, "int8")]


def _weights(n: int, k: int, scheme: str, copies: int) -> list[PackedWeight]:
    w = torch.randn(n, k) * 0.05
    make = quantize_int4 if scheme == "int4" else quantize_int8
    return [make(w + 1e-3 * i, 32) for i in range(copies)]


def _time(call: Callable[[PackedWeight], object], weights: list[PackedWeight],
          repeats: int) -> float:
    """Median microseconds a call, each round cycling 10 calls over the weights."""
    for p in weights:
        call(p)
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(10):
            call(weights[i % len(weights)])
        rounds.append((time.perf_counter() - start) / 10 * 1e6)
    return statistics.median(rounds)


def _times(x: torch.Tensor, weights: list[PackedWeight], dense: list[torch.Tensor],
           variants: list[tuple[str, cpu_native.Library]], repeats: int) -> dict[str, float]:
    """Microseconds a product of x by each weight: each native variant, torch's, dense."""
    out = {name: _time(lambda p, lib=lib: cpu_native.linear(x, p, lib), weights, repeats)
           for name, lib in variants}
    with cpu_native.turned_off():
        out["torch"] = _time(lambda p: quantized_linear(x, p), weights, repeats)
    by_id = {id(p): d for p, d in zip(weights, dense, strict=True)}
    out["dense_f32"] = _time(lambda p: F.linear(x, by_id[id(p)]), weights, repeats)
    return out


def run(rows: list[int], copies: int, repeats: int) -> list[dict]:
    variants = [(v.name, lib) for v in cpu_native.runnable()
                if (lib := cpu_native.load(v)) is not None]
    results = []
    for name, n, k, scheme in SHAPES:
        weights = _weights(n, k, scheme, copies)
        dense = [dequantize(p) for p in weights]
        for m in rows:
            times = _times(torch.randn(m, k), weights, dense, variants, repeats)
            results.append({"shape": name, "n": n, "k": k, "scheme": scheme, "rows": m, **times})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,9", help="comma-separated row counts")
    parser.add_argument("--weights", type=int, default=1, help="distinct copies cycled through")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    results = run([int(r) for r in args.rows.split(",")], args.weights, args.repeats)
    columns = [c for c in results[0] if c not in ("shape", "n", "k", "scheme", "rows")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.weights} weight copies; "
          "us a product")
    print(f"{'shape':>8} {'N x K':>11} {'scheme':>6} {'rows':>4} | "
          + " | ".join(f"{c:>10}" for c in columns))
    for r in results:
        print(f"{r['shape']:>8} {r['n']:>5}x{r['k']:<5} {r['scheme']:>6} {r['rows']:>4} | "
              + " | ".join(f"{r[c]:>10.1f}" for c in columns))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
