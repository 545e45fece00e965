"""Logprobs in the two OpenAI shapes: chat (`{"content": [...]}`) and completions
(`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`). A token's text is the
tokenizer's decoding of that single token; `bytes` are that text's UTF-8 bytes."""

from __future__ import annotations

from typing import Any

from server.engine.outputs import TokenLogprob


class TokenTexts:
    """Single-token decoding with a cache (top-k alternatives repeat a lot)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id])
            self._cache[token_id] = text
        return text


def _chat_entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> dict[str, Any]:
    """Chat format: one entry per generated token, each with its top alternatives."""
    content = []
    for e in entries:
        item = _chat_entry(texts(e.token_id), e.logprob)
        item["top_logprobs"] = [_chat_entry(texts(tid), lp) for tid, lp in e.top]
        content.append(item)
    return {"content": content}


def completion_logprobs(entries: list[TokenLogprob], texts: TokenTexts, offset: int,
                        first_token: int | None = None) -> tuple[dict[str, Any], int]:
    """Completions format, text offsets starting at `offset`; returns it and the next offset.
    `first_token`: a token before the entries whose logprob nothing gives (an echoed
    prompt's first), listed with a null logprob and null alternatives."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    if first_token is not None:
        text = texts(first_token)
        tokens.append(text)
        token_logprobs.append(None)
        tops.append(None)
        offsets.append(offset)
        offset += len(text)
    for e in entries:
        text = texts(e.token_id)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        top: dict[str, float] = {}
        for tid, lp in e.top:
            top.setdefault(texts(tid), lp)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    body = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": offsets}
    return body, offset
