"""`leapfrog train-drafter`: train a draft head, or with `--exit-layer` a self-speculation
adapter (`drafters.head`), for a model.

1. Data. By default the target answers prompts itself through the engine, greedily or
   `--answers-per-prompt` times at `--temperature` (self-distillation): the built-in
   training prompts (`drafters/data/train_prompts.jsonl`, disjoint from the benchmark
   prompts) or `--data`: JSONL prompts in the benchmark format
   (`messages` or `prompt`, optional `max_tokens`), or plain text (a `.txt` file, or JSONL
   lines with `text`), trained on as it is in chunks of `--max-text-tokens`, or token
   sequences that `--save-sequences` wrote (JSONL `ids`, and `first`: the position
   training starts from).
2. One teacher-forced forward of the target per sequence gives its hidden states.
3. The head trains on them (`drafters.train.train_head`) and is saved as one safetensors
   file, which `leapfrog serve --speculative head --speculative-model FILE` loads
   (`--speculative early-exit` for an adapter). The held-out
   sequences' offline acceptance is printed and saved in the file's metadata.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

from drafters.head import HeadConfig
from drafters.train import TrainConfig

BUILTIN = "drafters/data/train_prompts.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    t, h = TrainConfig(), HeadConfig
    p.add_argument("model", nargs="?", default=None, help="model path (default: the embedded model)")
    p.add_argument("--output", "-o", required=True, help="file to write the head to (.safetensors)")
    p.add_argument("--data", action="append", default=None,
                   help=f"training data (repeat for more files): JSONL prompts the model "
                   f"answers, text (.txt, or JSONL lines with 'text'), or saved sequences "
                   f"(--save-sequences); default: the built-in prompts ({BUILTIN})")
    p.add_argument("--save-sequences", default=None,
                   help="also write the token sequences trained on (JSONL 'ids' and 'first', "
                   "which --data reads back: another run skips generating the answers)")
    p.add_argument("--max-prompts", type=int, default=None, help="use at most this many prompts")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="answer length cap (default: each prompt's max_tokens)")
    p.add_argument("--answers-per-prompt", type=int, default=1,
                   help="answers generated for each prompt (more than 1 needs --temperature)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of the answers (0: greedy)")
    p.add_argument("--max-text-tokens", type=int, default=1024, help="chunk length for text data")
    p.add_argument("--max-num-seqs", type=int, default=32, help="answers generated at once")
    p.add_argument("--steps", type=int, default=t.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=t.batch_size, help="positions per step")
    p.add_argument("--lr", type=float, default=t.lr, help="peak learning rate")
    p.add_argument("--unroll", type=int, default=t.unroll, help="draft steps trained per position")
    p.add_argument("--draft-vocab-size", type=int, default=t.draft_vocab_size,
                   help="tokens the head can propose (the corpus's most frequent)")
    p.add_argument("--intermediate-size", type=int, default=None,
                   help="the head's MLP width (default: half the model's)")
    p.add_argument("--exit-layer", type=int, default=None,
                   help="train a self-speculation adapter on the model's first N layers "
                   "(serve with --speculative early-exit) instead of a draft head")
    p.add_argument("--threshold", type=float, default=h.threshold,
                   help="confidence below which drafting stops (after the first draft)")
    p.add_argument("--holdout", type=float, default=t.holdout, help="share of sequences held out")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", help="the model's dtype (the head trains in float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--result-json", default=None, help="write the training report here")


def _read_data(path: str | None) -> tuple[list[object], list[str], list[tuple[list[int], int]]]:
    """(prompts, texts, token sequences) from `--data` (see the module docs)."""
    from bench.datasets import load_jsonl_prompts

    if path is None:
        builtin = resources.files("drafters").joinpath("data/train_prompts.jsonl")
        return load_jsonl_prompts(builtin), [], []
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"train-drafter: no data file {path!r}")
    if file.suffix == ".txt":
        return [], [file.read_text(encoding="utf-8")], []
    rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    if rows and "text" in rows[0]:
        return [], [str(row["text"]) for row in rows], []
    if rows and "ids" in rows[0]:
        return [], [], [([int(t) for t in row["ids"]], int(row["first"])) for row in rows]
    return load_jsonl_prompts(file), [], []


def _sequences(llm: object, prompts: list[object], texts: list[str],
               args: argparse.Namespace) -> list[tuple[list[int], int]]:
    """(token ids, first trained position) per sequence: prompts with the model's answers
    (trained from the prompt's last token), text chunks (trained throughout)."""
    from server.engine.llm import chat_prompt_ids
    from server.engine.sampling_params import SamplingParams

    out: list[tuple[list[int], int]] = []
    if prompts:
        n = args.answers_per_prompt
        ids = [chat_prompt_ids(llm.tokenizer, p.messages) for p in prompts for _ in range(n)]
        params = [SamplingParams(max_tokens=args.max_tokens or p.max_tokens,
                                 temperature=args.temperature, seed=args.seed * n + i)
                  for p in prompts for i in range(n)]
        start = time.perf_counter()
        results = llm.generate(ids, params)
        made = sum(len(r.token_ids) for r in results)
        print(f"answers: {len(results)} prompts, {made} tokens in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        eos = llm.engine.eos_token_ids
        for r in results:
            tail = r.token_ids
            if r.finish_reason == "stop" and eos and (not tail or tail[-1] not in eos):
                tail = [*tail, eos[0]]  # (an answer that stopped at EOS ends with it)
            out.append((r.prompt_token_ids + tail, len(r.prompt_token_ids) - 1))
    size = args.max_text_tokens
    for text in texts:
        ids = llm.tokenizer(text).input_ids
        out.extend((ids[i:i + size], 0) for i in range(0, len(ids), size))
    return out


def _log(message: str) -> None:
    print(message, flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from drafters.head import config_for
    from drafters.train import build_corpus, train_head
    from server.engine.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.output).resolve().parent.is_dir():
        raise SystemExit(f"train-drafter: no directory for --output {args.output!r}")
    if args.answers_per_prompt < 1 or (args.answers_per_prompt > 1 and args.temperature <= 0):
        raise SystemExit("train-drafter: --answers-per-prompt must be 1, or more with "
                         "--temperature above 0 (greedy answers would repeat)")
    prompts, texts, sequences = [], [], []
    for path in args.data or [None]:
        more = _read_data(path)
        prompts, texts, sequences = prompts + more[0], texts + more[1], sequences + more[2]
    if args.max_prompts is not None:
        prompts = prompts[: args.max_prompts]
    # (a fixed KV cache: on CUDA the rest of the memory is the hidden states' and training's)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              enable_prefix_caching=False, kv_cache_memory_gb=1.0)
    model = llm.engine.model
    try:  # (bad settings fail here, not after the answers and the training)
        head_config = config_for(model, args.intermediate_size, args.threshold, args.exit_layer)
    except ValueError as e:
        raise SystemExit(f"train-drafter: {e}") from None
    sequences += _sequences(llm, prompts, texts, args)
    if args.save_sequences:
        Path(args.save_sequences).write_text("".join(
            json.dumps({"ids": ids, "first": first}) + "\n" for ids, first in sequences))
    start = time.perf_counter()
    corpus = build_corpus(model, sequences, _log, args.exit_layer)
    print(f"hidden states: {len(sequences)} sequences, {len(corpus.tokens)} tokens, "
          f"{corpus.num_positions} trained positions in {time.perf_counter() - start:.0f} s",
          flush=True)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      unroll=args.unroll, draft_vocab_size=args.draft_vocab_size,
                      holdout=args.holdout, seed=args.seed)
    head, report = train_head(model, corpus, head_config, cfg, _log)
    data = ", ".join(args.data or [BUILTIN])
    report.update(model=llm.engine.model_name, data=data, sequences=len(sequences),
                  tokens=len(corpus.tokens))
    head.save(args.output, model=llm.engine.model_name, data=data,
              held_out=json.dumps(report.get("held_out", {})))
    held = report.get("held_out")
    if held:
        print(f"held out ({held['positions']} positions, {args.unroll} drafts): "
              f"mean accepted length {held['mean_accepted_length']:.2f}, first draft right "
              f"{held['first_draft_accuracy']:.1%}, target's token in the draft vocabulary "
              f"{held['vocab_coverage']:.1%}")
    print(f"wrote {args.output}")
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
