"""`leapfrog bench prediction`: OpenAI's predicted outputs with n-gram drafting, one request
at a time: each prompt's greedy answer is generated, then asked for again with that answer,
one token changed in its middle (an edit the model will not make), as its prediction, and
without. The outputs must be the same; the speed and acceptance differ.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from server.benchmarks.common import config_of, machine, table, write_json

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "Describe the water cycle to a ten-year-old.",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model path (default: the embedded model)")
    p.add_argument("--tokens", type=int, default=160, help="tokens generated per request")
    p.add_argument("--repeats", type=int, default=3, help="runs per timing (best is kept)")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--result-json", default=None, help="write results here")


def run(args: argparse.Namespace) -> int:
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, speculative="ngram", kv_cache_memory_gb=0.5)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    llm.generate([llm.encode(PROMPTS[0], chat=True)], replace(params, max_tokens=8))  # warm-up
    rows, results, same = [], [], True
    for text in PROMPTS:
        prompt = llm.encode(text, chat=True)
        answer = llm.generate([prompt], params)[0].token_ids
        predicted = list(answer)
        middle = len(predicted) // 2
        predicted[middle] = predicted[middle + 1]
        timed = {}
        for name, p in (("none", params), ("prediction", replace(params, prediction=tuple(predicted)))):
            best, out = float("inf"), None
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = llm.generate([prompt], p)[0]
                best = min(best, time.perf_counter() - start)
            same &= out.token_ids == answer
            timed[name] = {"tok_s": len(out.token_ids) / best, "drafted": out.num_draft_tokens,
                           "accepted": out.num_accepted_tokens}
        results.append({"prompt": text, **timed})
        rows.append([text[:40], timed["none"]["tok_s"], timed["prediction"]["tok_s"],
                     timed["prediction"]["tok_s"] / timed["none"]["tok_s"],
                     f"{timed['none']['accepted']}/{timed['none']['drafted']}",
                     f"{timed['prediction']['accepted']}/{timed['prediction']['drafted']}"])
    print(f"model={args.model or 'default'} dtype={args.dtype} tokens={args.tokens} "
          f"threads={torch.get_num_threads()} (n-gram drafting in both columns)")
    print(table(["prompt", "tok/s without", "tok/s with prediction", "speed-up",
                 "accepted/drafted without", "with"], rows))
    print(f"same output with and without the prediction: {same}")
    write_json(args.result_json, {"machine": machine(), "config": config_of(args), "results": results})
    return 0 if same else 1


if __name__ == "__main__":  # `python -m server.benchmarks.prediction`
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
