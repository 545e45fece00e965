"""`leapfrog bench layers`: the CPU path's decode with the decoder layers in one native call
(`kernels.cpu_layers`) against the same kernels called layer by layer, op by op, from
Python: the default model's greedy decode (float32 activations, the GGUF served packed),
tokens/s at each batch size, the two sides alternating in one process (best of
`--repeats`), and whether both gave the same tokens (they compute the same bits).
"""

from __future__ import annotations

import argparse

import torch

from server.benchmarks.common import config_of, decode_side_by_side, machine, table, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated a request")
    p.add_argument("--repeats", type=int, default=3, help="rounds of each side (best is kept)")
    p.add_argument("--result-json", default=None, help="write results here")


def run(args: argparse.Namespace) -> int:
    from kernels import cpu_layers, cpu_native

    if not cpu_native.available():
        print("the native CPU kernels do not run here: nothing to compare")
        return 1
    rows = decode_side_by_side([int(b) for b in args.batch_sizes.split(",")], args.tokens,
                               args.repeats, cpu_layers.turned_off, ("one_call", "per_op"))
    print(f"default model decode (tokens/s), {args.tokens} tokens a request, "
          f"{cpu_native.variant_in_use()}, {torch.get_num_threads()} threads")
    print(table(["batch", "layers in one call", "op by op", "ratio", "same tokens"],
                [list(r.values()) for r in rows]))
    write_json(args.result_json, {"machine": machine(), "config": config_of(args),
                                  "decode": rows})
    return 0
