"""`leapfrog bench spec`: speculative decoding vs none, per prompt category, batch 1 and 16.

Both engines (speculation off and on) are loaded in one process and run the same greedy
requests back to back, so the speedup is a ratio from one run. The tokens must be identical
(lossless); the benchmark fails loudly if they are not, unless `--on-mismatch count`: on a
GPU in 16-bit dtypes, verifying k + 1 rows rounds differently from decoding one row, so a
near-tie between two tokens may go either way, and the run then counts the requests whose
outputs differ and the first position where they do.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from bench.datasets import load_builtin_prompts
from server.benchmarks.common import config_of, machine, table, write_json
from server.engine.config import EngineConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model path (default: the embedded model)")
    p.add_argument("--speculative", default="ngram", help="drafter to measure (ngram, head, early-exit, ngram-head, draft-model)")
    p.add_argument("--speculative-model", default=None, help="trained drafter weights (head, early-exit, ngram-head) or the draft model "
                   "(draft-model)")
    p.add_argument("--num-speculative-tokens", type=int, default=EngineConfig.num_speculative_tokens,
                   help="most draft tokens per step (the adaptive policy may use fewer)")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--max-tokens", type=int, default=128, help="cap on each prompt's output tokens")
    p.add_argument("--prompts-per-category", type=int, default=3, help="prompts per category at batch 1")
    p.add_argument("--categories", default=None, help="comma-separated subset of categories")
    p.add_argument("--dtype", default="float32", help="compute dtype for both engines")
    p.add_argument("--quantization", default=None, help="weight quantization for both engines")
    p.add_argument("--on-mismatch", choices=("fail", "count"), default="fail",
                   help="when speculative and plain outputs differ: fail, or count them")
    p.add_argument("--repeats", type=int, default=2,
                   help="interleaved off/on runs per measurement; the fastest of each is kept")
    p.add_argument("--no-verify-ahead", action="store_true",
                   help="CUDA: verification steps wait for the step before (LLMEngine.verify_ahead off)")
    p.add_argument("--result-json", default=None, help="write results here")


def _engines(args: argparse.Namespace, max_batch: int) -> tuple[object, object]:
    from server.engine.llm import LLM

    # (no prefix caching: each repeat computes its prompts, as before it; both engines live
    # at once, so each takes a fixed KV cache rather than a share of the GPU's memory)
    common = dict(dtype=args.dtype, quantization=args.quantization, max_num_seqs=max_batch,
                  max_num_batched_tokens=1024, enable_prefix_caching=False,
                  kv_cache_memory_gb=1.0)
    start = time.perf_counter()
    off = LLM(args.model, **common)
    middle = time.perf_counter()
    on = LLM(args.model, speculative=args.speculative, speculative_model=args.speculative_model,
             num_speculative_tokens=args.num_speculative_tokens, **common)
    on.engine.verify_ahead &= not args.no_verify_ahead
    # (on CUDA, start-up captures the graphs: decode only without speculation)
    print(f"start-up: {middle - start:.1f} s without speculation, "
          f"{time.perf_counter() - middle:.1f} s with", flush=True)
    return off, on


def _timed(llm: object, prompts: list[list[int]], max_tokens: list[int]) -> tuple[float, list]:
    from server.engine.sampling_params import SamplingParams

    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    return time.perf_counter() - start, results


def _divergence(a: list[int], b: list[int]) -> int | None:
    """First position where two token lists differ (in content or length), else None."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                None if len(a) == len(b) else min(len(a), len(b)))


def _verifications_ahead(llm: object) -> int:
    """Verification steps the engine has launched ahead of the step they follow (CUDA)."""
    engine = llm.engine
    return int(engine.metrics.registry.get_sample_value(
        "leapfrog:steps_launched_ahead_total",
        {"model_name": engine.model_name, "kind": "verification"}) or 0)


def _measure(off: object, on: object, prompts: list[list[int]], max_tokens: list[int], batch: int,
             repeats: int, on_mismatch: str = "fail") -> dict:
    ahead = _verifications_ahead(on)
    t_off = t_on = 0.0
    tokens = drafted = accepted = steps = 0
    diverged: list[int] = []
    for i in range(0, len(prompts), batch):
        chunk, caps = prompts[i : i + batch], max_tokens[i : i + batch]
        best_off = best_on = float("inf")
        for _ in range(repeats):  # interleaved, so slow spells of a shared machine hit both
            dt_off, ref = _timed(off, chunk, caps)
            dt_on, res = _timed(on, chunk, caps)
            best_off, best_on = min(best_off, dt_off), min(best_on, dt_on)
        t_off, t_on = t_off + best_off, t_on + best_on
        at = [_divergence(r.token_ids, s.token_ids) for r, s in zip(ref, res, strict=True)]
        if on_mismatch == "fail" and any(d is not None for d in at):
            raise RuntimeError("speculative output differs from plain greedy output (lossless check failed)")
        diverged += [d for d in at if d is not None]
        for r in res:
            tokens += len(r.token_ids)
            drafted += r.num_draft_tokens
            accepted += r.num_accepted_tokens
            steps += r.num_steps
    return {"tokens": tokens, "time_off_s": t_off, "time_on_s": t_on, "speedup": t_off / t_on,
            "drafted": drafted, "accepted": accepted, "mean_accepted_length": tokens / steps,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mismatched": len(diverged), "first_divergence": diverged,
            "verification_steps_ahead": _verifications_ahead(on) - ahead}


def _ms(times: dict[int, float]) -> dict[int, float]:
    return {n: round(t * 1e3, 3) for n, t in sorted(times.items())}


def run(args: argparse.Namespace) -> int:
    from server.engine.llm import chat_prompt_ids

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    wanted = set(args.categories.split(",")) if args.categories else None
    by_cat: dict[str, list] = defaultdict(list)
    for p in load_builtin_prompts():
        if wanted is None or p.category in wanted:
            by_cat[p.category].append(p)
    off, on = _engines(args, max(batch_sizes))
    tok = off.tokenizer
    policy = on.engine.scheduler.spec_policy
    off.generate([tok("warm up").input_ids])
    on.generate([tok("warm up").input_ids])
    results, rows = [], []
    for batch in batch_sizes:
        for cat, items in sorted(by_cat.items()):
            chosen = items[: args.prompts_per_category] if batch == 1 else [items[i % len(items)] for i in range(batch)]
            prompts = [chat_prompt_ids(tok, p.messages) for p in chosen]
            caps = [min(p.max_tokens, args.max_tokens) for p in chosen]
            m = _measure(off, on, prompts, caps, batch, args.repeats, args.on_mismatch)
            # what the adaptive policy had learned by the end of the category
            learned = policy.padded_costs.get(batch)
            m["policy_after"] = {"start_acceptance": round(policy.start, 3),
                                 "padded_costs_ms": _ms(learned.times) if learned else None}
            print(f"batch {batch} {cat}: speedup {m['speedup']:.2f}, verification steps "
                  f"launched ahead {m['verification_steps_ahead']}, then {m['policy_after']}",
                  flush=True)
            results.append({"batch": batch, "category": cat, **m})
            rows.append([batch, cat, m["tokens"], m["mean_accepted_length"], m["acceptance_rate"], m["speedup"],
                         m["mismatched"]])
    mismatched = sum(r["mismatched"] for r in results)
    outputs = "outputs identical" if not mismatched else f"{mismatched} outputs differ"
    print(f"drafter={args.speculative} k={args.num_speculative_tokens} dtype={args.dtype} "
          f"quantization={args.quantization} device={off.engine.device} (greedy, {outputs})")
    print(table(["batch", "category", "tokens", "mean acc. len", "accept rate", "speedup", "differ"], rows))
    costs = _ms(policy.costs.times)  # what the adaptive policy measured
    padded = {b: _ms(c.times) for b, c in sorted(policy.padded_costs.items())}
    print(f"step times (ms) by tokens computed: {costs}")
    if padded:
        print(f"padded step times (ms) by requests, then tokens a request: {padded}")
    print(f"new requests' acceptance estimate {policy.start:.2f}")
    write_json(args.result_json, {"config": config_of(args), "machine": machine(), "results": results,
                                  "step_costs_ms": costs, "padded_step_costs_ms": padded,
                                  "start_acceptance": policy.start})
    return 0


if __name__ == "__main__":  # `python -m server.benchmarks.spec`: without the CLI's server imports
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
