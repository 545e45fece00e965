"""`leapfrog serve` flags: every flag has --help text and a LEAPFROG_<FLAG> environment default.

`add_arguments` adds the flags to a parser; `configs_from_args` maps the parsed namespace
onto the two frozen configs (EngineConfig for the engine, ApiConfig for the HTTP server).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from server.api.config import ApiConfig
from server.api.reasoning import REASONING_PARSERS
from server.engine.config import EngineConfig, read_chat_template
from server.engine.sampling_params import POOLING
from server.models.rope import scaling_type

_ENV_PREFIX = "LEAPFROG_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_name(flag: str) -> str:
    """`--max-model-len` -> `LEAPFROG_MAX_MODEL_LEN`."""
    return _ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _env_bool(name: str) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SystemExit(f"{name}={raw!r}: expected one of {sorted(_TRUE | _FALSE - {''})}")


def _env_default(name: str, kind: Callable[[str], Any], default: Any) -> Any:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError as exc:
        raise SystemExit(f"{name}={raw!r}: {exc}") from exc


def json_object(text: str) -> dict[str, Any]:
    """A flag's JSON object value (ValueError for anything else)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


def _add(group: Any, flag: str, kind: Callable[[str], Any], default: Any, help: str,
         choices: list[str] | None = None) -> None:
    """A valued flag whose default comes from its environment variable when set."""
    name = env_name(flag)
    shown = "none" if default in (None, ()) else default
    group.add_argument(
        flag, type=kind, default=_env_default(name, kind, default), choices=choices,
        help=f"{help} (default: {shown}; env {name})",
    )


def _add_switch(group: Any, flag: str, help: str) -> None:
    name = env_name(flag)
    group.add_argument(flag, action="store_true", default=_env_bool(name), help=f"{help} (env {name})")


def _layer_list(raw: str) -> tuple[int, ...]:
    """`0,1,5` -> (0, 1, 5); '' -> ()."""
    try:
        return tuple(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated layer numbers, got {raw!r}") from None


def _origins(raw: str) -> tuple[str, ...]:
    """`https://a.example,https://b.example` -> a tuple of origins; '' -> ()."""
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _reasoning_parser(raw: str) -> str | None:
    """A name of REASONING_PARSERS; '' -> None (none)."""
    if raw and raw not in REASONING_PARSERS:
        raise ValueError(f"expected one of {', '.join(REASONING_PARSERS)}")
    return raw or None


_reasoning_parser.__name__ = "reasoning parser"  # (argparse's "invalid reasoning parser value")


def _token_pair(raw: str) -> tuple[str, str] | None:
    """`no,yes` -> ("no", "yes"); '' -> None."""
    if not raw:
        return None
    parts = raw.split(",")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"expected two tokens, NO,YES, got {raw!r}")
    return parts[0], parts[1]


_token_pair.__name__ = "token pair"  # (argparse's "invalid token pair value")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every `serve` flag (engine and HTTP server) to `parser`."""
    e, a = EngineConfig(), ApiConfig()
    parser.add_argument(
        "model", nargs="?", default=None,
        help="Local HF model directory or .gguf file; omitted: the embedded default "
        f"SmolLM2-135M-Instruct (env {env_name('model')})",
    )
    eng = parser.add_argument_group("engine")
    eng.add_argument("--model", dest="model_option", default=None,
                     help="The model, as the positional argument (vLLM's older spelling) "
                     f"(env {env_name('model')})")
    _add(eng, "--served-model-name", str, e.served_model_name,
         "Model name the API reports and accepts; defaults to the model's file or folder name")
    _add(eng, "--chat-template", str, e.chat_template,
         "A Jinja chat template, or a file holding one, used instead of the model's own; "
         "unset: the model's")
    _add(eng, "--max-model-len", int, e.max_model_len,
         "Longest prompt + output in tokens; defaults to min(model limit, 8192), a LongRoPE "
         "model's trained context at most (past it, its long factors serve)")
    _add(eng, "--rope-scaling", json_object, e.rope_scaling,
         "RoPE scaling replacing the model's own, as a JSON object in HF's rope_scaling form, "
         "e.g. '{\"rope_type\": \"yarn\", \"factor\": 4.0, "
         "\"original_max_position_embeddings\": 32768}' (also linear, llama3, default); "
         "with YaRN the model limit becomes factor x that context")
    _add(eng, "--max-num-seqs", int, e.max_num_seqs, "Most requests in the running batch")
    _add(eng, "--admit-batch", int, e.admit_batch,
         "With more requests waiting than the running batch has room for, take them in only "
         "once this many slots are free (or after 0.1 s): a step that takes in a prompt runs "
         "without CUDA graphs; unset: max-num-seqs / 8 with CUDA graphs, else 1")
    _add(eng, "--scheduling-policy", str, e.scheduling_policy,
         "fcfs: requests run in order of arrival; priority: by their `priority` field (lower "
         "first), then arrival, a higher value preempted first", choices=["fcfs", "priority"])
    _add(eng, "--max-waiting", int, e.max_waiting,
         "Most requests allowed to wait; more are rejected with HTTP 429")
    _add(eng, "--max-num-batched-tokens", int, e.max_num_batched_tokens,
         "Token budget of one engine step (prefill chunks, decode and draft tokens); unset: "
         "2048 on CUDA, 512 on a CPU")
    _add(eng, "--dtype", str, e.dtype, "Compute dtype",
         choices=["auto", "float32", "bfloat16", "float16"])
    _add(eng, "--device", str, e.device, "Device to run on", choices=["auto", "cpu", "cuda"])
    _add(eng, "--quantization", str, e.quantization,
         "Weight-only quantization applied at load (int8 or int4); unset, a GGUF's 4/8-bit "
         "tensors are served as stored where a packed kernel pays (the native CPU kernel, "
         "CUDA above 2 GiB); none serves every weight dense", choices=["int8", "int4", "none"])
    eng.add_argument(
        "--lora", action="append", default=None, metavar="PATH",
        help="A LoRA adapter (PEFT directory or llama.cpp GGUF adapter) merged into the "
        "weights at load; repeatable "
        f"(env {env_name('lora')}: paths split on commas)")
    eng.add_argument(
        "--lora-scaled", action="append", nargs=2, default=None, metavar=("PATH", "SCALE"),
        help="A LoRA adapter merged at load with its alpha / r multiplied by SCALE; "
        f"repeatable (env {env_name('lora-scaled')}: PATH=SCALE pairs split on commas)")
    _add(eng, "--block-size", int, e.block_size, "Tokens per KV cache block")
    _add(eng, "--num-kv-blocks", int, e.num_kv_blocks,
         "KV cache size in blocks; unset: sized from --kv-cache-memory-gb")
    _add(eng, "--kv-cache-memory-gb", float, e.kv_cache_memory_gb,
         "Memory for the KV cache (a draft model's included) when --num-kv-blocks is not "
         "given; unset: on CUDA what --gpu-memory-utilization leaves, elsewhere 1 GiB")
    _add(eng, "--gpu-memory-utilization", float, e.gpu_memory_utilization,
         "On CUDA without --kv-cache-memory-gb or --num-kv-blocks: share of the device's "
         "memory the engine takes; the KV cache gets what is left of it after what the "
         "device holds (weights, CUDA context, other processes) and the largest step")
    _add(eng, "--kv-cache-dtype", str, e.kv_cache_dtype,
         "KV cache element type; auto: the compute dtype. On the CPU float16 (or bfloat16) "
         "holds twice the tokens of float32 and halves what attention reads",
         choices=["auto", "float32", "bfloat16", "float16"])
    _add(eng, "--sliding-window", int, e.sliding_window,
         "Hybrid KV cache: tokens of recent context the sink + window layers see; their "
         "older blocks leave the cache. Unset: every layer sees the whole context")
    _add(eng, "--num-sink-tokens", int, e.num_sink_tokens,
         "With --sliding-window: first tokens every sink + window layer also sees")
    _add(eng, "--full-attention-layers", _layer_list, e.full_attention_layers,
         "With --sliding-window: comma-separated layers that keep full attention ('' for "
         "none); unset: the last layer and every third before it")
    _add(eng, "--speculative", str, e.speculative,
         "Drafter: ngram (prompt lookup); head (a trained draft head), early-exit "
         "(self-speculation) or ngram-head (lookup, then the head), each with "
         "--speculative-model; draft-model (a smaller model with the same tokenizer, "
         "named by --speculative-model); unset: no speculation")
    _add(eng, "--speculative-model", str, e.speculative_model,
         "Trained drafter weights (the file `leapfrog train-drafter` writes), or the "
         "draft model (a GGUF file or HF directory) for draft-model")
    _add(eng, "--num-speculative-tokens", int, e.num_speculative_tokens,
         "Most draft tokens per request per step")
    _add(eng, "--speculative-disable-by-batch-size", int, e.speculative_disable_by_batch_size,
         "With --speculative: steps of at least this many requests draft nothing, whatever "
         "the speculation policy would choose (n-gram drafting cost 0.77x at 64 concurrent "
         "requests on an H100)")
    _add(eng, "--seed", int, e.seed, "Seed for requests that give none")
    _add(eng, "--num-threads", int, e.num_threads, "CPU threads for torch; unset: torch's default")
    name = env_name("--enable-prefix-caching")
    eng.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction,
        default=_env_bool(name) if name in os.environ else e.enable_prefix_caching,
        help="Reuse the KV of prompts' shared beginnings (system prompts, earlier turns); "
        "unset: on unless --sliding-window or the model's own window is in use (env "
        f"{name})")
    _add_switch(eng, "--enforce-eager", "Disable CUDA graphs and compilation")
    _add(eng, "--prompt-graph-tokens", int, e.prompt_graph_tokens,
         "With CUDA graphs, steps that take in prompts of up to this many tokens in all (at "
         "most max-num-batched-tokens) replay graphs captured at start-up; 0: they run "
         "eagerly")
    _add_switch(eng, "--debug-check-integrity",
                "Check the KV block manager after every engine step (slow)")
    _add_server_arguments(parser.add_argument_group("http server"), a)


def _add_server_arguments(srv: Any, a: ApiConfig) -> None:
    _add(srv, "--host", str, a.host, "Interface to listen on")
    _add(srv, "--port", int, a.port, "TCP port to listen on")
    _add(srv, "--api-key", str, a.api_key,
         "Require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize")
    _add(srv, "--allowed-origins", _origins, a.allowed_origins,
         "Comma-separated web origins whose pages may call the API from a browser (CORS), "
         "or '*' for any; empty: none")
    _add(srv, "--max-body-bytes", int, a.max_body_bytes, "Largest request body; larger get HTTP 413")
    _add(srv, "--drain-timeout", float, a.drain_timeout_s,
         "Seconds in-flight requests may run after SIGTERM/SIGINT before exit")
    _add(srv, "--max-n", int, a.max_n, "Largest `n` (choices per prompt) a request may ask for")
    _add(srv, "--max-stored-responses", int, a.max_stored_responses,
         "Responses of /v1/responses kept in memory for previous_response_id and GET "
         "/v1/responses/{id} (the most recently used); 0 keeps none")
    _add(srv, "--reasoning-parser", _reasoning_parser, a.reasoning_parser,
         "Split chat replies of reasoning models into `reasoning` (the text before </think>) "
         "and `content` (the text after it): qwen3 (Qwen3; no </think>: content, unless the "
         "reply opened with <think>) or deepseek_r1 (DeepSeek-R1 distills, QwQ; no </think>: "
         "reasoning); unset: no split",
         choices=list(REASONING_PARSERS))
    _add(srv, "--pooling", str, a.pooling,
         "How /v1/embeddings pools an input's final hidden states into its embedding: last "
         "(its last token's: embedding models built on decoders) or mean; unset: what the "
         "model's files name (sentence-transformers' pooling config, a GGUF's pooling_type), "
         "else last",
         choices=list(POOLING))
    _add(srv, "--score-tokens", _token_pair, a.score_tokens,
         "NO,YES: /v1/score and /v1/rerank score a pair with the model as a judge, the next "
         "token's P(YES) / (P(NO) + P(YES)) after the pair's first text then its second (LM "
         "rerankers such as Qwen3-Reranker: no,yes, the texts in the model's prompt format); "
         "unset: the cosine of the texts' embeddings")
    _add(srv, "--log-level", str, a.log_level, "Log level",
         choices=["debug", "info", "warning", "error"])
    _add_switch(srv, "--log-prompts", "Log prompt text at DEBUG level (off: prompts are user data)")


def _lora_flags(plain: list[str] | None, scaled: list[list[str]] | None
                ) -> tuple[tuple[str, float], ...]:
    """(path, scale) of each --lora (scale 1; unset: $LEAPFROG_LORA's comma-separated
    paths) and each --lora-scaled (unset: $LEAPFROG_LORA_SCALED's PATH=SCALE pairs)."""
    if plain is None:
        plain = [p for p in os.environ.get(env_name("lora"), "").split(",") if p.strip()]
    if scaled is None:
        scaled = [list(pair.rpartition("=")[::2]) for pair in
                  os.environ.get(env_name("lora-scaled"), "").split(",") if pair.strip()]
    adapters = [(path, 1.0) for path in plain]
    for path, scale in scaled or ():
        try:
            adapters.append((path, float(scale)))
        except ValueError:
            raise SystemExit(f"error: --lora-scaled {path} {scale}: the scale is not a "
                             "number") from None
    return tuple(adapters)


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, ApiConfig]:
    """Map a namespace parsed with `add_arguments` onto (EngineConfig, ApiConfig)."""
    values = dict(vars(args))
    positional, option = values.pop("model"), values.pop("model_option")
    if positional is not None and option is not None and positional != option:
        raise SystemExit(f"error: two models given: {positional!r} and --model {option!r}")
    values["model"] = positional or option or os.environ.get(env_name("model"))
    values["lora"] = _lora_flags(values.pop("lora", None), values.pop("lora_scaled", None))
    try:
        engine = EngineConfig(**{f.name: values[f.name] for f in fields(EngineConfig)
                                 if f.name in values})
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if engine.chat_template is not None:  # (before the server starts: a typo ends it at once)
        try:
            read_chat_template(engine.chat_template)
        except ValueError as exc:
            raise SystemExit(f"error: --chat-template: {exc}") from None
    if engine.rope_scaling is not None:
        try:
            scaling_type(engine.rope_scaling)
        except ValueError as exc:
            raise SystemExit(f"error: --rope-scaling: {exc}") from None
    if engine.speculative_model is not None and not Path(engine.speculative_model).exists():
        raise SystemExit(f"error: --speculative-model: no such file or directory: "
                         f"{engine.speculative_model}")
    api = ApiConfig(
        host=args.host, port=args.port, api_key=args.api_key or None,
        max_body_bytes=args.max_body_bytes, drain_timeout_s=args.drain_timeout,
        max_n=args.max_n, max_stored_responses=args.max_stored_responses,
        log_prompts=args.log_prompts, log_level=args.log_level,
        allowed_origins=args.allowed_origins, reasoning_parser=args.reasoning_parser,
        pooling=args.pooling, score_tokens=args.score_tokens,
    )
    return engine, api
