"""`leapfrog bench prefix`: prefix caching on vs off, chat requests that share a long system
prompt, one after another (a chatbot's or an agent's traffic).

Each request is timed to its first token (its prefill) and to its last; the first request
of a run finds nothing cached, the others find the system prompt. Outputs are checked token
for token against the run without caching.
"""

from __future__ import annotations

import argparse
import time

import torch

from server.benchmarks.common import config_of, machine, pydoc_text, table, write_json

QUESTIONS = [
    "What does the with statement do?",
    "How are exceptions chained?",
    "Explain the difference between a list and a tuple.",
    "When is __init__ called?",
    "What is a generator expression?",
    "How does import find a module?",
    "What are keyword-only arguments?",
    "What does the global statement change?",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model path (default: the embedded model)")
    p.add_argument("--system-tokens", type=int, default=1024, help="tokens of the shared system prompt")
    p.add_argument("--requests", type=int, default=8, help="requests, one after another")
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--result-json", default=None, help="write results here")


def _prompts(llm: object, args: argparse.Namespace) -> list[list[int]]:
    """Chat prompts: the same system prompt (Python's documentation, cut to
    --system-tokens), then one question each."""
    from server.engine.llm import chat_prompt_ids

    tok = llm.tokenizer
    system = tok.decode(tok(pydoc_text()).input_ids[: args.system_tokens])
    return [chat_prompt_ids(tok, [{"role": "system", "content": system},
                                  {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
            for i in range(args.requests)]


def _run(llm: object, prompts: list[list[int]], tokens: int) -> tuple[list[float], list[float], list[list[int]]]:
    """Per request, one after another: seconds to its first token, to its last, its tokens."""
    from server.engine.sampling_params import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    first, total, outputs = [], [], []
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        engine.add_request(f"p{i}", prompt, params)
        out: list[int] = []
        while engine.has_unfinished():
            for o in engine.step():
                if o.new_token_ids and not out:
                    first.append(time.perf_counter() - start)
                out += o.new_token_ids
        total.append(time.perf_counter() - start)
        outputs.append(out)
    return first, total, outputs


def run(args: argparse.Namespace) -> int:
    from server.engine.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    results, rows, want = {}, [], None
    for caching in (False, True):
        llm = LLM(args.model, dtype=args.dtype, device=args.device, max_num_batched_tokens=2048,
                  enable_prefix_caching=caching)
        prompts = _prompts(llm, args)
        first, total, outputs = _run(llm, prompts, args.tokens)
        if want is None:
            want = outputs
        name = "on" if caching else "off"
        later = first[1:]
        results[name] = {"ttft_s": first, "total_s": total, "same_output": outputs == want,
                         "prompt_tokens": [len(p) for p in prompts]}
        rows.append([name, 1000 * first[0], 1000 * sum(later) / len(later),
                     1000 * sum(total) / len(total), outputs == want])
        del llm
    on, off = results["on"], results["off"]
    print(f"model={args.model or 'default'} device={args.device} dtype={args.dtype} "
          f"system_tokens={args.system_tokens} prompt_tokens={on['prompt_tokens'][0]}.."
          f"{max(on['prompt_tokens'])} requests={args.requests} tokens={args.tokens} "
          f"threads={torch.get_num_threads()}")
    print(table(["prefix caching", "TTFT first (ms)", "TTFT later, mean (ms)",
                 "request, mean (ms)", "same output"], rows))
    ratio = (sum(off["ttft_s"][1:]) / sum(on["ttft_s"][1:]))
    print(f"later requests' time to first token: {ratio:.2f}x faster with prefix caching; "
          f"whole requests: {sum(off['total_s']) / sum(on['total_s']):.2f}x")
    write_json(args.result_json, {"machine": machine(), "config": config_of(args), "results": results})
    return 0 if on["same_output"] else 1


if __name__ == "__main__":  # `python -m server.benchmarks.prefix`: without the CLI's server imports
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
