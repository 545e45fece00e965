"""POST /tokenize, POST /detokenize and GET /tokenizer_info, with the served model's
tokenizer: enough for a client to tokenize as the server does without the model's files
(lm-evaluation-harness's remote tokenizer takes these three)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from server.api.admission import admit, check_token_ids, vocab_size
from server.api.config import ApiConfig
from server.api.protocol import DetokenizeRequest, TokenizeRequest
from server.api.serving_chat import render_chat
from server.api.state import ServerState


async def tokenize(request: Request, state: ServerState, api: ApiConfig) -> dict[str, Any]:
    """A prompt (or chat messages, through the chat template) to token ids."""
    engine, req = await admit(request, state, api, TokenizeRequest)
    if req.messages is not None:
        _, tokens = render_chat(engine.tokenizer, req.messages, req.tools,
                                req.template_options())
    else:
        tokens = engine.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len}


def tokenizer_info(state: ServerState) -> dict[str, Any]:
    """The tokenizer's special tokens, chat template and sizes (vLLM's `/tokenizer_info`)."""
    engine = state.require_engine()
    tok = engine.tokenizer
    return {"tokenizer_class": type(tok).__name__, "bos_token": tok.bos_token,
            "eos_token": tok.eos_token, "pad_token": tok.pad_token, "unk_token": tok.unk_token,
            "chat_template": tok.chat_template, "vocab_size": vocab_size(tok),
            "model_max_length": engine.max_model_len}


async def detokenize(request: Request, state: ServerState, api: ApiConfig) -> dict[str, Any]:
    """Token ids to text."""
    engine, req = await admit(request, state, api, DetokenizeRequest)
    check_token_ids(req.tokens, engine.tokenizer, "tokens")
    return {"prompt": engine.tokenizer.decode(req.tokens)}
