"""`leapfrog bench layers`: the CPU path's decode with the decoder layers in one native call
(`kernels.cpu_layers`) against the same kernels called layer by layer, op by op, from
Python: the default model's greedy decode (float32 activations, the GGUF served packed),
tokens/s at each batch size, the two sides alternating in one process (best of
`--repeats`), and whether both gave the same tokens (they compute the same bits). Then its
prefill at each `--prefill-lengths`, the prompt's chunks of up to
`batch_builder.NATIVE_PREFILL_KEYS` keys through the native attention (so their steps run in
one native call) against every chunk of more than `SHORT_QUERY` tokens through torch's
(`batch_builder.torch_prefill`).
"""

from __future__ import annotations

import argparse
import time

import torch

from server.benchmarks.common import (
    config_of,
    decode_side_by_side,
    machine,
    pydoc_text,
    side_by_side,
    table,
    write_json,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated a request")
    p.add_argument("--prefill-lengths", default="32,128,512,1024,2048",
                   help="comma-separated prompt lengths (tokens) for the prefill comparison")
    p.add_argument("--repeats", type=int, default=3, help="rounds of each side (best is kept)")
    p.add_argument("--result-json", default=None, help="write results here")


def prefill_side_by_side(lengths: list[int], repeats: int) -> list[dict[str, object]]:
    """Prefill tokens/s of the default model (served packed, no prefix caching) over the
    first `lengths` tokens of a long English text, one token generated, prefill chunks
    through the native attention as usual and inside `torch_prefill()`, alternating."""
    from server.engine.batch_builder import torch_prefill
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    llm = LLM(None, max_model_len=max(lengths) + 1, enable_prefix_caching=False)
    text = llm.encode(pydoc_text())
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def prefill(n: int) -> float:
        start = time.perf_counter()
        llm.generate([text[:n]], params)
        return time.perf_counter() - start

    prefill(32)  # warm-up
    rows = []
    for n in lengths:
        native, torch_chunks = side_by_side(lambda on, n=n: prefill(n), repeats, torch_prefill)
        rows.append({"prompt_tokens": n, "native": n / native, "torch": n / torch_chunks,
                     "ratio": torch_chunks / native})
    return rows


def run(args: argparse.Namespace) -> int:
    from kernels import cpu_layers, cpu_native
    from server.engine.batch_builder import NATIVE_PREFILL_KEYS

    if not cpu_native.available():
        print("the native CPU kernels do not run here: nothing to compare")
        return 1
    rows = decode_side_by_side([int(b) for b in args.batch_sizes.split(",")], args.tokens,
                               args.repeats, cpu_layers.turned_off, ("one_call", "per_op"))
    print(f"default model decode (tokens/s), {args.tokens} tokens a request, "
          f"{cpu_native.variant_in_use()}, {torch.get_num_threads()} threads")
    print(table(["batch", "layers in one call", "op by op", "ratio", "same tokens"],
                [list(r.values()) for r in rows]))
    lengths = [int(n) for n in args.prefill_lengths.split(",") if n]
    prefill = prefill_side_by_side(lengths, args.repeats) if lengths else []
    if prefill:
        print(f"\ndefault model prefill (tokens/s), chunks of up to {NATIVE_PREFILL_KEYS} keys "
              f"through the native attention against torch's")
        print(table(["prompt tokens", "native", "torch", "ratio"],
                    [list(r.values()) for r in prefill]))
    write_json(args.result_json, {"machine": machine(), "config": config_of(args),
                                  "decode": rows, "prefill": prefill})
    return 0
