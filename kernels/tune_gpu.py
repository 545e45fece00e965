"""Tune a model's decode GEMVs on this CUDA device into the device's table (`kernels.gemv_table`).

`python3 -m kernels.tune_gpu [--model llama3-8b | default | PATH | --config config.json]
[--schemes int4 bf16] [--group G] [--rows 1 5 ... 16] [--out PATH]` takes every projection
of the model's decoder layers (fused qkv, o, fused gate/up, down) and its LM head (`--model`:
the built-in 8B shape, or a model as the server takes it: the default model, a GGUF file or
a Hugging Face directory; only its config is read), and for each weight scheme:

- int4 / int8, packed as the server packs dense checkpoints
  (`server.models.quantize.quantize_dense`), or in groups of G (`--group 32` for the int4
  and Q8_0 tensors of GGUF files): the tensor-core GEMV (`kernels.triton_mma_gemv`)
  at each row count of --rows (1 stands for the tuner's key of 1-4 rows; int8 stops at 8),
  and at one row handing its sums to the next kernel (`kernels.gemv_sums`, the layers only);
- bf16: the dense GEMV (one row), with the input step the decoder layer fuses into it
  (the norm for qkv and gate/up, the SwiGLU for down).

Every candidate the autotuner would try is timed as `kernels.bench_gpu` times kernels: one
CUDA graph runs it over enough weight copies to overflow L2, median of replays. The four
fastest are timed twice more, and the fastest of those timings goes into the table with
its time. Entries of other keys already in the file stay. Then commit the table (the
package ships `kernels/tables/*.json`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kernels.bench_gpu import _copies, _graph_time, copy_bandwidth
from kernels.gemv_table import table_path, write_table

SCHEMES = ("int4", "int8", "bf16")
ROWS = (1, *range(5, 17))


def projections(config) -> dict[str, tuple[int, int, int]]:
    """name: (N, K, the dense GEMV's prologue) of each projection a decode step runs
    (`server.models.llama`; prologue 0 none, 1 the norm, 2 the SwiGLU)."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    h, i = config.hidden_size, config.intermediate_size
    return {"qkv": (q + 2 * kv, h, 1), "o": (h, q, 0), "gate_up": (2 * i, h, 1),
            "down": (h, i, 2), "lm_head": (config.vocab_size, h, 0)}


def tabled(label: str, kernel: str, key: dict, configs: list[dict],
           make_op: Callable[[dict], Callable], x: torch.Tensor, weights: list) -> dict:
    """The table entry of `kernel` at `key`: the configuration whose op runs fastest over
    `weights`, with its time (printed after `label`)."""
    first = sorted((_graph_time(make_op(c), x, weights), i) for i, c in enumerate(configs))
    seconds, best = min(
        (min(t, *(_graph_time(make_op(configs[i]), x, weights) for _ in range(2))), i)
        for t, i in first[:4])
    print(f"{label} {kernel}: {configs[best]} {seconds * 1e6:.2f} us (of {len(configs)})",
          flush=True)
    return dict(kernel=kernel, key=key, config=configs[best], us=round(seconds * 1e6, 2),
                candidates=len(configs))


def packed_copies(n: int, k: int, scheme: str, group: int | None) -> list:
    """A random [n, k] weight packed as the server packs dense checkpoints (or in groups of
    `group`), and enough copies of it to overflow L2."""
    from kernels.quant import quantize, to_words
    from server.models.quantize import quantize_dense

    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    packed = to_words(quantize_dense(w, scheme) if group is None else quantize(w, scheme, group))
    return [packed] + [packed.to("cuda") for _ in range(_copies(packed.nbytes()) - 1)]


def tune_packed(name: str, copies: list, m: int) -> list[dict]:
    """Table entries of the mma GEMV at m rows (and at one row of its sums, for the layers'
    projections) for one packed projection; none where the kernel does not serve it."""
    from kernels.gemv_sums import mma_gemv_sums
    from kernels.triton_mma_gemv import GROUP_ROWS, candidates, mma_gemv, mma_gemv_supported

    packed = copies[0]
    n, k, int8 = packed.out_features, packed.in_features, packed.scheme == "int8"
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    if not mma_gemv_supported(x, packed):
        return []
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    key = dict(N=n, K=k, GROUP=packed.group_size, INT8=int8)
    kinds = [("mma_gemv", key | {"M_KEY": max(m, GROUP_ROWS)},
              lambda c: lambda x_, p_: mma_gemv(x_, p_, out, c))]
    if m == 1 and name != "lm_head":
        kinds.append(("mma_gemv_sums", key, lambda c: lambda x_, p_: mma_gemv_sums(x_, p_, c)))
    entries = []
    for kernel, kernel_key, make_op in kinds:
        entries.append(tabled(f"{name} {n}x{k} {packed.scheme} M={m}", kernel, kernel_key,
                              candidates(n, k, packed.group_size, int8, m), make_op, x,
                              copies))
        if kernel == "mma_gemv_sums":  # the timed runs added into the device's sums
            # buffer; one more run returns the region they used, which is then cleared (as
            # the next fused kernel would), so that later sums in this process start at 0
            make_op(entries[-1]["config"])(x, packed).sums.zero_()
    return entries


def tune_dense(name: str, n: int, k: int, prologue: int) -> dict:
    """The table entry of the dense bf16 GEMV for one projection, with its prologue."""
    from kernels.triton_dense_gemv import dense_candidates, dense_gemv

    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    copies = [w] + [w.clone() for _ in range(_copies(w.nbytes) - 1)]
    x = torch.randn(1, 2 * k if prologue == 2 else k, device="cuda", dtype=torch.bfloat16)
    residual, norm_weight = torch.randn_like(x), torch.rand(k, device="cuda",
                                                              dtype=torch.bfloat16)

    def make_op(c: dict) -> Callable:
        if prologue == 1:
            return lambda x_, w_: dense_gemv(x_, w_, config=c, norm=(residual, norm_weight, 1e-5))
        if prologue == 2:
            return lambda x_, w_: dense_gemv(x_, w_, config=c, silu=True)
        out_dtype = torch.float32 if name == "lm_head" else None
        return lambda x_, w_: dense_gemv(x_, w_, out_dtype, config=c)

    return tabled(f"{name} {n}x{k} bf16", "dense_gemv", dict(N=n, K=k, PROLOGUE=prologue),
                  dense_candidates(n, k), make_op, x, copies)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b",
                        help="llama3-8b (the shape of server.benchmarks.gpu_decode), default "
                             "(the embedded default model), or a GGUF file or HF directory")
    parser.add_argument("--config", help="a Hugging Face config.json instead of --model")
    parser.add_argument("--schemes", nargs="*", choices=SCHEMES, default=["int4", "bf16"])
    parser.add_argument("--group", type=int,
                        help="group size of the packed weights (default: as the server "
                             "quantizes dense checkpoints; 32 for the GGUF types repacked)")
    parser.add_argument("--rows", type=int, nargs="*", default=list(ROWS),
                        help="rows of the packed GEMV's keys (1 is the key of 1-4 rows)")
    parser.add_argument("--out", help="the table to write (default: this device's, in the "
                                      "package)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels.tune_gpu needs a CUDA device")
    from server.models.config import config_from_hf

    if args.config:
        with open(args.config) as f:
            config = config_from_hf(json.load(f))
    elif args.model == "llama3-8b":
        from server.benchmarks.gpu_decode import llama3_8b

        config = config_from_hf(llama3_8b().to_dict())
    else:
        from server.models.loader import open_checkpoint

        config = open_checkpoint(None if args.model == "default" else args.model).config
    shapes = projections(config)
    device_name = torch.cuda.get_device_name()
    path = table_path(device_name) if args.out is None else Path(args.out)
    import triton

    run = {"command": " ".join(["python3 -m kernels.tune_gpu", *sys.argv[1:]]),
           "torch": torch.__version__, "triton": triton.__version__,
           "copy_bandwidth_gbps": round(copy_bandwidth() / 1e9)}
    start = time.perf_counter()
    torch.manual_seed(0)
    written = 0
    for scheme in args.schemes:  # (the table is written as it grows: a run cut short
        # keeps what it timed)
        if scheme == "bf16":
            entries = [tune_dense(name, n, k, prologue)
                       for name, (n, k, prologue) in shapes.items()]
            write_table(path, device_name, run if not written else None, entries)
            written += len(entries)
            continue
        weights = {name: packed_copies(n, k, scheme, args.group)
                   for name, (n, k, _) in shapes.items()}
        for m in args.rows:
            entries = [e for name, copies in weights.items() for e in tune_packed(name, copies, m)]
            write_table(path, device_name, run if not written else None, entries)
            written += len(entries)
        del weights
    print(f"wrote {written} entries to {path} ({time.perf_counter() - start:.0f} s)")

if __name__ == "__main__":
    main()
