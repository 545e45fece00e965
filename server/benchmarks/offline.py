"""`leapfrog bench offline`: our engine vs `transformers` generate, same weights and dtype.

Decode speed is measured as (N - 1) / (t(N tokens) - t(1 token)) so prefill cancels out;
batch throughput is generated tokens / wall time for B prompts of N tokens each; prefill is
`PREFILL_TOKENS` / the time to answer one prompt of that many tokens with one token.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from server.benchmarks.common import PROMPT, best_time, config_of, machine, table, write_json

PREFILL_TOKENS = 512


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model path (default: the embedded model)")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (both sides use it)")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=2, help="runs per measurement (best is kept)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for both sides")
    p.add_argument("--quantization", default=None,
                   help="also time our engine with packed weights (int4|int8), or every weight "
                        "dense (none)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--result-json", default=None, help="write results here")


def _measure(run: Callable[[int, int, bool], None], args: argparse.Namespace,
             batch_sizes: list[int]) -> dict[str, float]:
    """Batch-1 decode rate, prefill rate and per-batch throughput of `run(batch, new_tokens,
    long)` (long: the `PREFILL_TOKENS` prompt)."""
    run(1, 4, False)  # warm-up
    t1 = best_time(lambda: run(1, 1, False), args.repeats)
    tn = best_time(lambda: run(1, args.tokens, False), args.repeats)
    out = {"decode_b1": (args.tokens - 1) / (tn - t1),
           f"prefill_{PREFILL_TOKENS}": PREFILL_TOKENS / best_time(lambda: run(1, 1, True),
                                                                  args.repeats)}
    for b in batch_sizes:
        out[f"throughput_b{b}"] = b * args.tokens / best_time(
            lambda b=b: run(b, args.tokens, False), args.repeats)
    return out


def _ours(args: argparse.Namespace, batch_sizes: list[int], quantization: str | None,
          torch_kernels: bool = False) -> dict[str, float]:
    """Our engine; `torch_kernels`: packed weights through torch's CPU kernels, not the
    native one."""
    if torch_kernels:
        from kernels import cpu_native

        with cpu_native.turned_off():
            return _ours(args, batch_sizes, quantization)
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    # (no prefix caching: the repeated prompts are computed each time, as transformers does)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=max(batch_sizes), max_num_batched_tokens=2048,
              quantization=quantization, enable_prefix_caching=False)
    ids = llm.encode(PROMPT, chat=True)
    long_ids = _long_prompt(ids)

    def run(batch: int, n: int, long: bool) -> None:
        llm.generate([long_ids if long else ids] * batch,
                     SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))

    return _measure(run, args, batch_sizes)


def _long_prompt(ids: list[int]) -> list[int]:
    """`PREFILL_TOKENS` ids: the prompt repeated."""
    return (ids * (PREFILL_TOKENS // len(ids) + 1))[:PREFILL_TOKENS]


def _transformers(args: argparse.Namespace, batch_sizes: list[int]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.engine.llm import chat_prompt_ids
    from server.models.loader import resolve_model_path

    path = resolve_model_path(args.model)
    kw = {"gguf_file": path.name} if path.is_file() else {}
    where = str(path.parent) if path.is_file() else str(path)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw).eval()
    tok = AutoTokenizer.from_pretrained(where, **kw)
    ids = torch.tensor([chat_prompt_ids(tok, [{"role": "user", "content": PROMPT}])])

    long_ids = torch.tensor([_long_prompt(ids[0].tolist())])

    @torch.inference_mode()
    def run(batch: int, n: int, long: bool) -> None:
        x = (long_ids if long else ids).repeat(batch, 1)
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=tok.eos_token_id)

    return _measure(run, args, batch_sizes)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    ref = {} if args.no_transformers else _transformers(args, batch_sizes)
    runs = {"leapfrog": _ours(args, batch_sizes, None)}
    if args.quantization:
        runs[f"leapfrog {args.quantization}"] = _ours(args, batch_sizes, args.quantization)
        from kernels import cpu_native

        if (args.quantization != "none" and not torch.cuda.is_available()
                and cpu_native.available()):
            # the same with torch's packed CPU kernels, side by side
            runs[f"{args.quantization} torch kernels"] = _ours(
                args, batch_sizes, args.quantization, torch_kernels=True)
    headers = ["metric", "transformers"]
    for name in runs:
        headers += [name, "ratio"]
    rows = []
    for key in runs["leapfrog"]:
        row: list[object] = [key, ref.get(key, float("nan"))]
        for ours in runs.values():
            row += [ours[key], ours[key] / ref[key] if key in ref else float("nan")]
        rows.append(row)
    print(f"model={args.model or 'default'} dtype={args.dtype} tokens={args.tokens} "
          f"threads={torch.get_num_threads()} (tokens/s; ratio = leapfrog / transformers)")
    print(table(headers, rows))
    for name, ours in runs.items():
        top = ours[f"throughput_b{max(batch_sizes)}"]
        print(f"{name}: batch-{max(batch_sizes)} throughput / batch-1 decode = {top / ours['decode_b1']:.2f}x")
    write_json(args.result_json, {"config": config_of(args), "machine": machine(), "transformers": ref, **runs})
    return 0
