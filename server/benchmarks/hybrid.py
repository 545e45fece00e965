"""`leapfrog bench hybrid`: what a hybrid KV cache (sink + window layers beside full-attention
ones) and a 16-bit KV cache (`--kv-cache-dtypes`) cost in quality and give in memory and
decode speed, against full attention in float32 (the compute dtype).

For each configuration at each KV cache dtype, in one process:
- quality: the mean negative log-likelihood (and perplexity) of a long English text
  (Python's own documentation, `pydoc_data`, so the text is on every machine), teacher
  forced in one forward through the engine's model with its attention policy per layer
  (`kernels.attention`'s reference attention), over all positions and over those past the
  largest window;
- memory: the tokens of context the KV cache holds in `--kv-cache-memory-gb` (the
  full-attention layers' pool, after the window pool's share for `--max-num-seqs`
  requests), and the KV bytes a token of context costs beyond the window;
- speed: batch-1 decode tokens/s after a prompt of `--decode-context` tokens, through the
  engine (N - 1 tokens over the time from the first token to the last), every
  configuration's engine taking its turn in each of `--repeats` rounds (best kept).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from server.benchmarks.common import config_of, machine, pydoc_text, table, write_json

CHUNK = 512  # rows of logits at a time
# the default layout with and without sinks, and no full-attention layer, at two windows
CONFIGS = "256/4/default;256/0/default;256/4/;1024/4/default;1024/4/"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model path (default: the embedded model)")
    p.add_argument("--configs", default=CONFIGS,
                   help="semicolon-separated WINDOW/SINKS/LAYERS hybrid configurations (LAYERS: "
                   "'default', comma-separated full-attention layers, or empty for none), each "
                   "against full attention; empty: full attention alone")
    p.add_argument("--kv-cache-dtypes", default="auto",
                   help="comma-separated KV cache element types, each configuration at each "
                        "(auto: the compute dtype; float16, bfloat16, float32)")
    p.add_argument("--text-tokens", type=int, default=4096, help="tokens of text scored")
    p.add_argument("--decode-context", type=int, default=3072,
                   help="prompt tokens before the timed decode (0: no timing)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="tokens decoded when timed (default: 32 on the CPU, 512 on CUDA, "
                        "whose steps take under a millisecond)")
    p.add_argument("--repeats", type=int, default=2, help="runs per timing (best is kept)")
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="cache size for the memory figures")
    p.add_argument("--max-num-seqs", type=int, default=16, help="requests the window pool is sized for")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--result-json", default=None, help="write results here")


def _configs(spec: str) -> list[tuple[str, dict[str, object]]]:
    """(name, engine settings): full attention, then each WINDOW/SINKS/LAYERS of `spec`."""
    out: list[tuple[str, dict[str, object]]] = [("full", {})]
    for item in filter(None, spec.split(";")):
        window, sinks, layers = item.split("/")
        settings: dict[str, object] = {"sliding_window": int(window), "num_sink_tokens": int(sinks)}
        if layers != "default":
            settings["full_attention_layers"] = tuple(int(x) for x in layers.split(",") if x)
        out.append((f"w{window} s{sinks} {layers or 'none'}", settings))
    return out


@torch.inference_mode()
def teacher_forced_hidden(llm: object, ids: list[int]) -> torch.Tensor:
    """Final hidden states [len(ids), hidden] of one forward over `ids` through the
    engine's model (`LlamaForCausalLM.teacher_forced`), each layer attending as the
    engine's runner set it (`kernels.attention`'s reference attention on CPU)."""
    from server.engine.block_manager import window_kwargs

    engine = llm.engine
    return engine.model.teacher_forced(ids, engine.blocks.block_size,
                                       [window_kwargs(w) for w in engine.runner.windows])


@torch.inference_mode()
def _nll(llm: object, ids: list[int]) -> torch.Tensor:
    """Negative log-likelihood of each token of `ids` after the first
    (`teacher_forced_hidden`)."""
    model = llm.engine.model
    hidden = teacher_forced_hidden(llm, ids)
    target = torch.tensor(ids[1:], device=hidden.device)
    parts = []
    for start in range(0, len(ids) - 1, CHUNK):
        logits = model.compute_logits(hidden[start:min(start + CHUNK, len(ids) - 1)])
        rows = target[start:start + CHUNK]
        parts.append(-logits.log_softmax(-1).gather(1, rows[:, None]).squeeze(1).cpu())
    return torch.cat(parts)


def _decode_tokens(args: argparse.Namespace) -> int:
    return args.decode_tokens or (32 if args.device == "cpu" else 512)


def _decode_rates(llms: list[object], ids: list[int], args: argparse.Namespace) -> list[float]:
    """Batch-1 decode tokens/s of each engine after the prompt `ids`: (N - 1) tokens over
    the time from the first token to the last, so the prefill (seconds on the CPU, and
    noisy) is not in it. The engines take turns in each round (the machine's speed
    drifts); each one's best round is kept."""
    from server.engine.sampling_params import SamplingParams

    n = _decode_tokens(args)
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    def run(llm: object, name: str) -> float:
        engine, times = llm.engine, []
        engine.add_request(name, ids, params)
        while engine.has_unfinished():
            new = sum(len(o.new_token_ids) for o in engine.step())
            times += [time.perf_counter()] * new  # when the step's tokens are out
        return (n - 1) / (times[-1] - times[0])

    for llm in llms:
        run(llm, "bench-warm-up")  # (a process's first decode steps on CUDA are slow)
    best = [0.0] * len(llms)
    for r in range(args.repeats):
        best = [max(rate, run(llm, f"bench-{r}")) for rate, llm in zip(best, llms, strict=True)]
    return best


def run(args: argparse.Namespace) -> int:
    from server.engine.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [(name if kv == "auto" else f"{name} kv {kv}", settings, kv)
               for name, settings in _configs(args.configs)
               for kv in args.kv_cache_dtypes.split(",")]
    windows = [int(settings["sliding_window"]) for _, settings, _ in configs
               if "sliding_window" in settings]
    largest = max(windows, default=0)
    common = dict(dtype=args.dtype, device=args.device, kv_cache_memory_gb=args.kv_cache_memory_gb,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=512,
                  max_model_len=max(args.text_tokens, args.decode_context + _decode_tokens(args)) + 1)
    results, llms = [], []
    ids: list[int] = []
    for name, settings, kv in configs:
        llm = LLM(args.model, **common, **settings, kv_cache_dtype=kv)
        if not ids:
            ids = llm.encode(pydoc_text())[: args.text_tokens]
        nll = _nll(llm, ids)
        past = nll[largest:]
        blocks = llm.engine.blocks
        c, bs = llm.engine.model_config, blocks.block_size
        full_layers = c.num_layers - sum(layer.windowed for layer in llm.engine.model.layers)
        per_token = (2 * full_layers * c.num_kv_heads * c.head_dim
                     * llm.engine.kv_dtype.itemsize)
        results.append({"config": name, "settings": settings, "kv_cache_dtype": kv,
                        "full_attention_layers": full_layers, "nll": nll.mean().item(),
                        "ppl": nll.mean().exp().item(),
                        "nll_past_largest_window": past.mean().item(),
                        "context_tokens": blocks.num_blocks * bs if full_layers else None,
                        "kv_bytes_per_token": per_token})
        print(results[-1], flush=True)
        llms.append(llm)
    rates = (_decode_rates(llms, ids[: args.decode_context], args) if args.decode_context
             else [None] * len(llms))
    rows = []
    for r, rate in zip(results, rates, strict=True):
        r["decode_tok_s"] = rate
        rows.append([r["config"], r["full_attention_layers"], r["ppl"],
                     math.exp(r["nll_past_largest_window"]),
                     "unbounded" if r["context_tokens"] is None else r["context_tokens"],
                     r["kv_bytes_per_token"], "-" if rate is None else rate])
    full = results[0]
    print(f"model={args.model or 'default'} device={args.device} dtype={args.dtype} "
          f"text_tokens={len(ids)} decode_context="
          f"{args.decode_context} kv_cache_memory_gb={args.kv_cache_memory_gb} "
          f"max_num_seqs={args.max_num_seqs} threads={torch.get_num_threads()}")
    print(table(["config", "full layers", "ppl", f"ppl past {largest}", "context tokens",
                 "KV bytes/token", "decode tok/s"], rows))
    if full["decode_tok_s"]:
        for r in results[1:]:
            context = (f", context {r['context_tokens'] / full['context_tokens']:.2f}x"
                       if r["context_tokens"] else "")
            print(f"{r['config']}: decode {r['decode_tok_s'] / full['decode_tok_s']:.2f}x "
                  f"{full['config']}{context}")
    write_json(args.result_json, {"machine": machine(), "config": config_of(args),
                                  "results": results})
    return 0


if __name__ == "__main__":  # `python -m server.benchmarks.hybrid`: without the CLI's server imports
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
