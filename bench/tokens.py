"""Token counts when the server reports no usage.

Order of preference per request: the server's `usage` (already set by the client), then a
local `transformers` tokenizer (`--tokenizer`, a model directory or a GGUF file) counting the
generated text as vLLM's benchmark does, then the number of streamed text chunks (a lower
bound when a chunk can hold several tokens). Each result records which one it used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.client import RequestResult
from bench.datasets import BenchRequest


def load_tokenizer(path: str) -> Any:
    """A `transformers` AutoTokenizer from a local directory or a `.gguf` file."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise RuntimeError("--tokenizer needs the `transformers` package") from exc
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--tokenizer: {path} does not exist")
    if p.is_file() and p.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return AutoTokenizer.from_pretrained(str(p))


def count_prompt_tokens(tokenizer: Any, req: BenchRequest, endpoint: str) -> int:
    """Prompt length: with the chat template for the chat endpoint when there is one."""
    if endpoint == "chat" and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(req.messages, tokenize=True,
                                            add_generation_prompt=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)
    return len(tokenizer.encode(req.prompt_text(), add_special_tokens=False))


def fill_token_counts(
    results: list[RequestResult], requests: list[BenchRequest], tokenizer: Any | None,
    endpoint: str,
) -> None:
    """Set output (and prompt) token counts on successful results that lack them."""
    by_id = {r.id: r for r in requests}
    for res in results:
        if not res.success:
            continue
        req = by_id[res.request_id]
        if res.prompt_tokens is None and tokenizer is not None:
            res.prompt_tokens = count_prompt_tokens(tokenizer, req, endpoint)
        if res.output_tokens is not None:
            continue
        if tokenizer is not None:
            res.output_tokens = len(tokenizer.encode(res.text, add_special_tokens=False))
            res.token_source = "tokenizer"
        else:
            res.output_tokens = res.num_chunks
            res.token_source = "chunks"
