"""`leapfrog bench offline`: our engine vs `transformers` generate, same weights and dtype.

Decode speed is measured as (N - 1) / (t(N tokens) - t(1 token)) so prefill cancels out;
batch throughput is generated tokens / wall time for B prompts of N tokens each.
"""

from __future__ import annotations

import argparse

import torch

from server.benchmarks.common import best_time, machine, table, write_json

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model path (default: the embedded model)")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (both sides use it)")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=2, help="runs per measurement (best is kept)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--result-json", default=None, help="write results here")


def _ours(args: argparse.Namespace, batch_sizes: list[int]) -> dict[str, float]:
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=max(batch_sizes), max_num_batched_tokens=2048)
    ids = llm.encode(PROMPT, chat=True)

    def run(batch: int, n: int) -> None:
        llm.generate([ids] * batch, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))

    run(1, 4)  # warm-up
    t1 = best_time(lambda: run(1, 1), args.repeats)
    tn = best_time(lambda: run(1, args.tokens), args.repeats)
    out = {"decode_b1": (args.tokens - 1) / (tn - t1)}
    for b in batch_sizes:
        out[f"throughput_b{b}"] = b * args.tokens / best_time(lambda b=b: run(b, args.tokens), args.repeats)
    return out


def _transformers(args: argparse.Namespace, batch_sizes: list[int]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.models.loader import resolve_model_path

    path = resolve_model_path(args.model)
    kw = {"gguf_file": path.name} if path.is_file() else {}
    where = str(path.parent) if path.is_file() else str(path)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw).eval()
    tok = AutoTokenizer.from_pretrained(where, **kw)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]

    @torch.inference_mode()
    def run(batch: int, n: int) -> None:
        x = ids.repeat(batch, 1)
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=tok.eos_token_id)

    run(1, 4)
    t1 = best_time(lambda: run(1, 1), args.repeats)
    tn = best_time(lambda: run(1, args.tokens), args.repeats)
    out = {"decode_b1": (args.tokens - 1) / (tn - t1)}
    for b in batch_sizes:
        out[f"throughput_b{b}"] = b * args.tokens / best_time(lambda b=b: run(b, args.tokens), args.repeats)
    return out


def run(args: argparse.Namespace) -> int:
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    ours = _ours(args, batch_sizes)
    ref = {} if args.no_transformers else _transformers(args, batch_sizes)
    rows = []
    for key in ours:
        ratio = ours[key] / ref[key] if key in ref else float("nan")
        rows.append([key, ours[key], ref.get(key, float("nan")), ratio])
    print(f"model={args.model or 'default'} dtype={args.dtype} tokens={args.tokens} (tokens/s)")
    print(table(["metric", "leapfrog", "transformers", "ratio"], rows))
    b1, top = ours["decode_b1"], ours[f"throughput_b{max(batch_sizes)}"]
    print(f"batch-{max(batch_sizes)} throughput / batch-1 decode: {top / b1:.2f}x")
    write_json(args.result_json, {"config": vars(args), "machine": machine(), "leapfrog": ours,
                                  "transformers": ref})
    return 0
