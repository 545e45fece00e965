"""`leapfrog` command line: serve, generate, bench (serve | offline | spec | ...), train-drafter."""

from __future__ import annotations

import argparse
import logging
import sys

from server import server_version
from server.engine.config import EngineConfig


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--speculative", default=None, help="drafter name (ngram, head, early-exit, ngram-head, draft-model); default off")
    p.add_argument("--speculative-model", default=None, help="trained drafter weights (head, early-exit, ngram-head) or the draft model (draft-model)")
    p.add_argument("--num-speculative-tokens", type=int, default=EngineConfig.num_speculative_tokens,
                   help="most draft tokens per step")


def _run_generate(args: argparse.Namespace) -> int:
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    llm = LLM(args.model, dtype=args.dtype, speculative=args.speculative,
              speculative_model=args.speculative_model,
              num_speculative_tokens=args.num_speculative_tokens)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    result = llm.generate([args.prompt], params, chat=args.chat)[0]
    print(result.text)
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from server.api.app import serve
    from server.api.cli_args import configs_from_args

    engine_config, api_config = configs_from_args(args)
    return serve(engine_config, api_config)


def build_parser() -> argparse.ArgumentParser:
    from bench import serve as bench_serve
    from server import train_drafter
    from server.api.cli_args import add_arguments as add_serve_arguments
    from server.benchmarks import (
        attention,
        hybrid,
        layers,
        offline,
        phases,
        prediction,
        prefix,
        spec,
    )

    parser = argparse.ArgumentParser(prog="leapfrog", description="LLM inference server with speculative decoding")
    parser.add_argument("--version", action="version", version=f"leapfrog {server_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    add_serve_arguments(serve)
    serve.set_defaults(func=_run_serve)
    gen = sub.add_parser("generate", help="generate a completion for one prompt and print it")
    _generate_arguments(gen)
    gen.set_defaults(func=_run_generate)
    train = sub.add_parser("train-drafter", help="train a draft head for a model (self-distilled)")
    train_drafter.add_arguments(train)
    train.set_defaults(func=train_drafter.run)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    for name, module, text in (
        ("serve", bench_serve, "load-test any OpenAI-compatible server over HTTP"),
        ("offline", offline, "offline decode speed vs transformers on the same weights"),
        ("spec", spec, "speculative decoding speedup and acceptance per prompt category"),
        ("phases", phases, "where an engine step's time goes (host phases, model), by step shape"),
        ("prefix", prefix, "prefix caching on vs off: chat requests sharing a system prompt"),
        ("prediction", prediction, "OpenAI's predicted outputs with n-gram drafting vs none"),
        ("hybrid", hybrid, "hybrid KV cache (sink + window layers) vs full attention: quality, "
         "memory, decode speed"),
        ("attention", attention, "CPU attention of decode steps: the native kernel vs torch's"),
        ("layers", layers, "CPU decode with the decoder layers in one native call vs op by op"),
    ):
        p = bench.add_parser(name, help=text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
