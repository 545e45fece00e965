"""POST /v1/chat/completions: render messages with the chat template, generate, and format
the reply as `chat.completion` (or `chat.completion.chunk` events when streaming)."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from server.api.admission import (
    check_model,
    check_n,
    new_request_id,
    resolve_max_tokens,
    sampling_params,
)
from server.api.body import parse_body
from server.api.config import ApiConfig
from server.api.errors import bad_request
from server.api.generation import ChoiceResult, check_context_length, make_jobs
from server.api.logprobs import TokenTexts, chat_logprobs
from server.api.protocol import ChatCompletionRequest, ChatMessage
from server.api.serving import Generation
from server.api.state import ServerState
from server.engine.outputs import RequestOutput

logger = logging.getLogger("leapfrog.api")


def render_chat(tokenizer: Any, messages: list[ChatMessage]) -> tuple[str, list[int]]:
    """The prompt text from the model's chat template, and its token ids."""
    try:
        text = tokenizer.apply_chat_template(
            [m.as_template_dict() for m in messages], tokenize=False, add_generation_prompt=True,
        )
    except Exception as exc:  # jinja raises for conversations the template rejects
        raise bad_request(f"The chat template rejected these messages: {exc}",
                          param="messages") from exc
    return text, tokenizer.encode(text, add_special_tokens=False)


class ChatFormatter:
    """OpenAI chat response bodies and stream chunks for one request."""

    def __init__(self, request_id: str, model: str, num_choices: int,
                 texts: TokenTexts | None) -> None:
        self.request_id, self.model, self.num_choices = request_id, model, num_choices
        self.texts = texts
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created,
                "model": self.model, "choices": choices}

    def prelude(self) -> list[dict[str, Any]]:
        return [self._envelope("chat.completion.chunk", [{
            "index": i, "delta": {"role": "assistant", "content": ""},
            "logprobs": None, "finish_reason": None,
        }]) for i in range(self.num_choices)]

    def delta(self, index: int, out: RequestOutput) -> dict[str, Any] | None:
        wants_logprobs = self.texts is not None and bool(out.logprobs)
        if not (out.new_text or out.finished or wants_logprobs):
            return None
        return self._envelope("chat.completion.chunk", [{
            "index": index,
            "delta": {"content": out.new_text} if out.new_text else {},
            "logprobs": chat_logprobs(out.logprobs, self.texts) if wants_logprobs else None,
            "finish_reason": out.finish_reason if out.finished else None,
        }])

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope("chat.completion.chunk", []), "usage": usage}

    def response(self, results: list[ChoiceResult], usage: dict[str, Any]) -> dict[str, Any]:
        choices = [{
            "index": i,
            "message": {"role": "assistant", "content": "".join(r.text)},
            "logprobs": chat_logprobs(r.logprobs, self.texts) if self.texts else None,
            "finish_reason": r.finish_reason,
        } for i, r in enumerate(results)]
        return {**self._envelope("chat.completion", choices), "usage": usage}


async def create_chat_completion(request: Request, state: ServerState, api: ApiConfig) -> Response:
    engine = state.require_engine()
    req = await parse_body(request, ChatCompletionRequest, api.max_body_bytes)
    check_model(req.model, engine)
    check_n(req.n, api.max_n)
    request_id = new_request_id("chatcmpl")
    text, prompt_ids = render_chat(engine.tokenizer, req.messages)
    if api.log_prompts:
        logger.debug("request %s prompt: %r", request_id, text)
    max_tokens = resolve_max_tokens(req.requested_max_tokens(), len(prompt_ids),
                                    engine.max_model_len)
    params = sampling_params(req, max_tokens, req.num_logprobs(), engine.tokenizer,
                             req.json_schema())
    check_context_length(len(prompt_ids), max_tokens, engine.max_model_len)
    jobs = make_jobs(request_id, [prompt_ids], req.n, params)
    texts = TokenTexts(engine.tokenizer) if req.logprobs else None
    formatter = ChatFormatter(request_id, engine.model_name, req.n, texts)
    generation = Generation(state, engine, jobs, [len(prompt_ids)], formatter, req.user)
    return await generation.respond(request, req.stream, req.include_usage)
