"""POST /v1/chat/completions: render messages (and tools) with the chat template, generate,
and format the reply as `chat.completion` (or `chat.completion.chunk` events when
streaming), its reasoning split off as `server.api.reasoning` describes (with a
`--reasoning-parser`) and its tool calls read out of the rest as `server.api.tools` does."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from server.api.admission import (
    admit_generation,
    check_n,
    keep_last,
    new_request_id,
    resolve_max_tokens,
    sampling_params,
)
from server.api.config import ApiConfig
from server.api.errors import bad_request
from server.api.generation import ChoiceResult, check_context_length, make_jobs
from server.api.logprobs import TokenTexts, chat_logprobs
from server.api.protocol import ChatCompletionRequest
from server.api.protocol_messages import ChatMessage
from server.api.protocol_tools import Tool
from server.api.reasoning import REASONING_PARSERS, ReasoningParser, with_reasoning_tokens
from server.api.serving import Generation
from server.api.state import EngineClient, ServerState
from server.api.tools import (
    CALL_CLOSE,
    CALL_OPEN,
    NO_TOOLS,
    ToolMode,
    call_id,
    call_schema,
    held_back,
    maybe_bare_call,
    read_calls,
    tool_mode,
)
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams

logger = logging.getLogger("leapfrog.api")


def render_chat(tokenizer: Any, messages: list[ChatMessage], tools: list[Tool] | None,
                options: dict[str, Any]) -> tuple[str, list[int]]:
    """The prompt text from the model's chat template (given `tools`, if any, and
    `ChatTemplateOptions.template_options`), and its token ids."""
    extra = {"tools": [t.model_dump(exclude_none=True) for t in tools]} if tools else {}
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("The model has no chat template: start the server with "
                          "--chat-template, or send the prompt to /v1/completions.",
                          param="messages", code="no_chat_template")
    try:
        text = tokenizer.apply_chat_template(
            [m.as_template_dict() for m in messages], tokenize=False, **options, **extra)
    except Exception as exc:  # jinja raises for conversations the template rejects
        raise bad_request(f"The chat template rejected these messages: {exc}",
                          param="messages") from exc
    return text, tokenizer.encode(text, add_special_tokens=False)


def prediction_usage(prediction: Sequence[int], outputs: list[list[int]]) -> dict[str, int]:
    """OpenAI's usage of a predicted output, over every choice: its tokens that appear in
    the output (each output token matching one prediction token, in any order: linear in
    their lengths, where an alignment could cost their product on the event loop) and
    those that do not."""
    predicted = Counter(prediction)
    accepted = sum(sum((predicted & Counter(out)).values()) for out in outputs)
    return {"accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": len(prediction) * len(outputs) - accepted}


class ChatFormatter:
    """OpenAI chat response bodies and stream chunks for one request. With a reasoning
    parser, a choice's reasoning is split off its text first (`message.reasoning`; streamed,
    `delta.reasoning`), the rest being its content. With tools, a choice's calls are read
    out of its content (`server.api.tools.read_calls`); streamed, a named call's arguments go
    out as they come, while "auto" streams the content before a `<tool_call>` and
    "required" nothing, each sending its calls whole when the choice ends."""

    named_events = False

    done_marker = True

    def __init__(self, request_id: str, model: str, num_choices: int,
                 texts: TokenTexts | None, mode: ToolMode = NO_TOOLS,
                 reasoning: ReasoningParser | None = None, prediction: tuple[int, ...] = ()
                 ) -> None:
        """`prediction`: the request's predicted output's tokens, which the usage reports
        on (`prediction_usage`)."""
        self.request_id, self.model, self.num_choices = request_id, model, num_choices
        self.texts, self.mode, self.reasoning = texts, mode, reasoning
        self.prediction = prediction
        self.thoughts = [reasoning.stream() for _ in range(num_choices)] if reasoning else []
        self.created = int(time.time())
        self.text = [""] * num_choices  # each choice's text so far (tool modes)
        self.sent = [0] * num_choices  # of which streamed as content (auto)
        self.call_id: list[str | None] = [None] * num_choices  # (named)

    def _usage(self, usage: dict[str, Any], results: list[ChoiceResult]) -> dict[str, Any]:
        usage = with_reasoning_tokens(usage, self.reasoning, results)
        if not self.prediction:
            return usage
        details = {**usage.get("completion_tokens_details", {}),
                   **prediction_usage(self.prediction, [r.token_ids for r in results])}
        return {**usage, "completion_tokens_details": details}

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created,
                "model": self.model, "choices": choices}

    def prelude(self) -> list[dict[str, Any]]:
        return [self._envelope("chat.completion.chunk", [{
            "index": i, "delta": {"role": "assistant", "content": ""},
            "logprobs": None, "finish_reason": None,
        }]) for i in range(self.num_choices)]

    def _finish_reason(self, reason: str | None, calls: list[dict[str, Any]]) -> str | None:
        """"tool_calls" where the model chose to call ("auto", "required") and stopped by
        itself; a named call ends with "stop", as OpenAI's do."""
        return "tool_calls" if calls and reason == "stop" and self.mode.kind != "named" \
            else reason

    def _tool_delta(self, index: int, new_text: str, out: RequestOutput
                    ) -> tuple[dict[str, Any], str | None]:
        """The delta and finish reason of a streamed output (whose content grew by
        `new_text`) in a tool mode."""
        self.text[index] += new_text
        text, reason = self.text[index], out.finish_reason if out.finished else None
        if self.mode.kind == "named":
            first = self.call_id[index] is None
            if first:
                self.call_id[index] = call_id()
            call: dict[str, Any] = {"index": 0, "function": {"arguments": new_text}}
            if first:
                call.update(id=self.call_id[index], type="function")
                call["function"]["name"] = self.mode.name
            return ({"tool_calls": [call]} if new_text or first else {}), reason
        start = self.sent[index]
        if self.mode.kind == "auto":  # the text before any call, less a possible tag's start
            end = text.find(CALL_OPEN)
            if end < 0:
                end = len(text) if out.finished else len(text) - held_back(text)
            if start == 0 and not out.finished and (maybe_bare_call(text) or not text.strip()):
                end = 0  # all of it may be a bare call: held to the end
            self.sent[index] = max(start, end)
        if out.finished:
            _, calls = read_calls(text, self.mode)
            if calls:
                last = text.rfind(CALL_CLOSE)  # (a bare call: none, and nothing after it)
                after = text[last + len(CALL_CLOSE):].strip() if last >= 0 else ""
                tail = text[start:self.sent[index]] + after if CALL_OPEN in text else ""
                delta: dict[str, Any] = {"content": tail} if tail else {}
                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
                return delta, self._finish_reason(reason, calls)
            self.sent[index] = len(text)  # no calls after all: the rest is content
        piece = text[start:self.sent[index]]
        return ({"content": piece} if piece else {}), reason

    def delta(self, index: int, out: RequestOutput) -> dict[str, Any] | None:
        wants_logprobs = self.texts is not None and bool(out.logprobs)
        thought, new_text = "", out.new_text
        if self.reasoning is not None:
            thought, new_text = self.thoughts[index].feed(out.new_text, out.finished)
        if self.mode.kind == "none":
            delta = {"content": new_text} if new_text else {}
            reason = out.finish_reason if out.finished else None
        else:
            delta, reason = self._tool_delta(index, new_text, out)
        if thought:
            delta = {"reasoning": thought, **delta}
        if not (delta or out.finished or wants_logprobs):
            return None
        return self._envelope("chat.completion.chunk", [{
            "index": index,
            "delta": delta,
            "logprobs": chat_logprobs(out.logprobs, self.texts) if wants_logprobs else None,
            "finish_reason": reason,
            "stop_reason": out.stop_reason,
        }])

    def closing(self, results: list[ChoiceResult], usage: dict[str, Any],
                include_usage: bool) -> list[dict[str, Any]]:
        """After the last delta: the usage chunk, when asked for."""
        if not include_usage:
            return []
        return [{**self._envelope("chat.completion.chunk", []),
                 "usage": self._usage(usage, results)}]

    def response(self, results: list[ChoiceResult], usage: dict[str, Any]) -> dict[str, Any]:
        choices = []
        for i, r in enumerate(results):
            reasoning, text = None, "".join(r.text)
            if self.reasoning is not None:
                reasoning, text = self.reasoning.split(text)
            content, calls = read_calls(text, self.mode) if text is not None else (None, [])
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if self.reasoning is not None:
                message["reasoning"] = reasoning
            if calls:
                message["tool_calls"] = calls
            choices.append({
                "index": i, "message": message,
                "logprobs": chat_logprobs(r.logprobs, self.texts) if self.texts else None,
                "finish_reason": self._finish_reason(r.finish_reason, calls),
                "stop_reason": r.stop_reason,
            })
        return {**self._envelope("chat.completion", choices),
                "usage": self._usage(usage, results)}


@dataclasses.dataclass
class ChatJob:
    """A chat request made ready for the engine (shared with the Responses API)."""

    mode: ToolMode
    prompt_ids: list[int]
    params: SamplingParams
    reasoning: ReasoningParser | None = None
    """How its reply's reasoning is split off; None: it is not."""


def prepare_chat(req: ChatCompletionRequest, engine: EngineClient, api: ApiConfig,
                 request_id: str) -> ChatJob:
    """The request's tool mode, its prompt through the chat template, its sampling
    parameters (a forced call's schema, or the response format's) and the server's reasoning
    parser, unless the output is constrained from its first token (a forced call, JSON, ...)
    and so holds no reasoning; 400s for what cannot be served."""
    mode = tool_mode(req, engine.tokenizer)
    text, prompt_ids = render_chat(engine.tokenizer, req.messages,
                                   req.tools if mode.kind != "none" else None,
                                   req.template_options())
    if api.log_prompts:
        logger.debug("request %s prompt: %r", request_id, text)
    prompt_ids = keep_last([prompt_ids], req.truncate_prompt_tokens,
                           engine.max_model_len - (req.requested_max_tokens() or 1))[0]
    max_tokens = resolve_max_tokens(req.requested_max_tokens(), len(prompt_ids),
                                    engine.max_model_len)
    params = sampling_params(req, max_tokens, req.num_logprobs(), engine.tokenizer,
                             call_schema(req, mode) if mode.constrained else req.json_schema())
    reasoning = REASONING_PARSERS[api.reasoning_parser] \
        if api.reasoning_parser and params.structured is None else None
    if mode.kind == "auto" or reasoning:  # the tags may be special tokens: keep them to read
        params = dataclasses.replace(params, skip_special_tokens=False)
    if req.prediction is not None:  # (drafted from, with n-gram speculation)
        predicted = engine.tokenizer.encode(req.prediction.text(), add_special_tokens=False)
        if len(predicted) > engine.max_model_len:  # (no reply holds it; indexing it costs)
            raise bad_request(f"The prediction holds {len(predicted)} tokens, more than this "
                              f"model's context of {engine.max_model_len}.", param="prediction")
        params = dataclasses.replace(params, prediction=tuple(predicted))
    check_context_length(len(prompt_ids), max_tokens, engine.max_model_len)
    return ChatJob(mode, prompt_ids, params, reasoning)


async def create_chat_completion(request: Request, state: ServerState, api: ApiConfig) -> Response:
    engine, req = await admit_generation(request, state, api, ChatCompletionRequest)
    check_n(req.n, api.max_n)
    request_id = new_request_id("chatcmpl")
    job = prepare_chat(req, engine, api, request_id)
    jobs = make_jobs(request_id, [job.prompt_ids], req.n, job.params)
    texts = TokenTexts(engine.tokenizer) if req.logprobs else None
    formatter = ChatFormatter(request_id, engine.model_name, req.n, texts, job.mode,
                              job.reasoning, job.params.prediction)
    generation = Generation(state, engine, jobs, [len(job.prompt_ids)], formatter, req.user)
    return await generation.respond(request, req.stream, req.include_usage, req.continuous_usage)
