"""Steps that take in prompts, through the engine on CUDA: prompt graphs
(`server.engine.cuda_graphs`, `--prompt-graph-tokens`, 2,048 here unless given) against
the same steps run eagerly (`--prompt-graph-tokens 0`), in one run.

For each engine: a prompt of each length alone (the time to its first token, but for the
tokenizer and HTTP), then with `--decoding` requests decoding, a decode step and a step
that also takes in a 100-token prompt; medians of `--repeats` steps, each timed from a
synchronized device to the step's end (the tokens back on the host).

    python3 -m server.benchmarks.prompt_steps MODEL [--dtype bfloat16] [--lengths 16 100 ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams


def _timed(engine, add=None) -> float:
    """Milliseconds of one engine step (after `add()` queues its new request, if any)."""
    if add is not None:
        add()
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def measure(llm: LLM, lengths: list[int], decoding: int, repeats: int) -> dict[str, float]:
    """Median step times (ms) by name: "prompt N" alone, "decode" and "decode + prompt 100"
    with `decoding` requests decoding."""
    engine = llm.engine
    gen = torch.Generator().manual_seed(0)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    endless = SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True)
    count = [0]

    def add(length: int, params: SamplingParams):
        def queue() -> None:
            count[0] += 1
            ids = torch.randint(3, 100, (length,), generator=gen).tolist()
            engine.add_request(f"r{count[0]}", ids, params)
        return queue

    def drain() -> None:
        while engine.has_unfinished():
            engine.step()

    for _ in range(3):  # (first steps of each shape)
        for length in lengths:
            _timed(engine, add(length, one))
            drain()
    found = {}
    for length in lengths:
        times = []
        for _ in range(repeats):
            times.append(_timed(engine, add(length, one)))
            drain()
        found[f"prompt {length}"] = statistics.median(times)
    for _ in range(decoding):
        _timed(engine, add(100, endless))
    for _ in range(5):
        _timed(engine)
    found["decode"] = statistics.median(_timed(engine) for _ in range(repeats))
    found["decode + prompt 100"] = statistics.median(
        _timed(engine, add(100, endless)) for _ in range(repeats))
    for request_id in list(engine.scheduler.requests):
        engine.abort_request(request_id)
    drain()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a checkpoint directory or .gguf file")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 100, 300, 1000])
    parser.add_argument("--decoding", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-memory-gb", type=float, default=4.0)
    parser.add_argument("--prompt-graph-tokens", type=int, default=2048,
                        help="the prompt-graph engine's --prompt-graph-tokens")
    args = parser.parse_args()
    results = {}
    for name, tokens in (("prompt graphs", args.prompt_graph_tokens), ("eager", 0)):
        llm = LLM(args.model, dtype=args.dtype, device="cuda", max_model_len=args.max_model_len,
                  kv_cache_memory_gb=args.kv_cache_memory_gb, prompt_graph_tokens=tokens)
        results[name] = measure(llm, args.lengths, args.decoding, args.repeats)
        del llm
        torch.cuda.empty_cache()
    print(f"{'step (ms, median of ' + str(args.repeats) + ')':<34}{'prompt graphs':>14}"
          f"{'eager':>10}{'eager / graphs':>16}")
    for key in results["eager"]:
        graphed, eager = results["prompt graphs"][key], results["eager"][key]
        name = key if key.startswith("prompt") else f"{args.decoding} decoding: {key}"
        print(f"{name:<34}{graphed:>14.2f}{eager:>10.2f}{eager / graphed:>15.2f}x")


if __name__ == "__main__":
    main()
