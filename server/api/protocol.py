"""OpenAI request models (pydantic). Unknown fields are rejected (extra="forbid"), so a field
we do not support (functions, best_of, ...) gets a 400 that names it instead of being
silently ignored. Range checks on sampling values are SamplingParams' job. Chat messages:
`protocol_messages`."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from server.api.protocol_base import OpenAIBookkeeping, StrictModel, conflict
from server.api.protocol_messages import ChatMessage, Prediction
from server.api.protocol_tools import NamedToolChoice, Tool

_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")

MAX_STOP_STRINGS = 32
"""OpenAI's API takes 4, vLLM any number; evaluation harnesses send a task's stop strings
and the EOS token's text (lm-evaluation-harness: often 5 or more)."""


class StreamOptions(StrictModel):
    """`stream_options`: a final chunk with the usage object when include_usage is set;
    with vLLM's continuous_usage_stats too, every chunk carries the usage so far."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


class StructuredOutputs(StrictModel):
    """vLLM's `structured_outputs`: the output's structure, one of a JSON schema (an object,
    or its JSON text), any JSON object (`json_object: true`), a regular expression, a list
    of texts to choose from, or an EBNF grammar (xgrammar's syntax, GBNF's)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    @model_validator(mode="after")
    def _one_structure(self) -> StructuredOutputs:
        given = [name for name in ("json", "json_object", "regex", "choice", "grammar")
                 if getattr(self, "json_schema" if name == "json" else name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of json, json_object, regex, choice and "
                             f"grammar (got {given or 'none'})")
        return self

    def structure(self) -> dict[str, Any]:
        """As `SamplingParams` fields: json_schema (JSON text), regex, choice or grammar."""
        if self.json_object:
            return {"json_schema": '{"type": "object"}'}
        if self.json_schema is not None:
            schema = self.json_schema
            return {"json_schema": schema if isinstance(schema, str) else json.dumps(schema)}
        if self.regex is not None:
            return {"regex": self.regex}
        if self.choice is not None:
            return {"choice": list(self.choice)}
        return {"grammar": self.grammar}


class SamplingRequest(OpenAIBookkeeping):
    """Fields shared by chat and completions requests."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    logit_bias: dict[int, float] | None = None
    """Token id (a JSON object's keys are strings: pydantic parses them) -> bias."""
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    """(vLLM's extension) False keeps special tokens in the text."""
    include_stop_str_in_output: bool = False
    """(vLLM's extension) The text ends after the stop string that matched, not before."""
    user: str | None = None
    priority: int = 0
    """vLLM's: with --scheduling-policy priority, lower runs first; else it must be 0."""
    allowed_token_ids: list[int] | None = None
    """vLLM's: only these tokens may be chosen."""
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    """vLLM's: the prompt's last this many tokens only (-1: as many as the context allows
    beside max_tokens; 0 or unset: all)."""
    store: bool | None = None
    """OpenAI's stored completions: accepted; nothing is stored here."""
    metadata: dict[str, str] | None = None
    """Tags of a stored completion (`store`): accepted, not kept."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    structured_outputs: StructuredOutputs | None = None
    """(vLLM's extension) The output's structure: `StructuredOutputs`."""
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    """(vLLM's older spelling of structured_outputs' json, regex, choice and grammar)"""

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("n")
    @classmethod
    def _positive_n(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"n must be >= 1, got {value}")
        return value

    def structure(self) -> dict[str, Any]:
        """The structure the request gives its output, as `SamplingParams` fields (none:
        {}); `structured_outputs` or one guided_* field, never both (`_one_structure`)."""
        if self.structured_outputs is not None:
            return self.structured_outputs.structure()
        if not self._guided():
            return {}
        return StructuredOutputs(json=self.guided_json, regex=self.guided_regex,
                                 choice=self.guided_choice, grammar=self.guided_grammar).structure()

    def _guided(self) -> list[str]:
        return [name for name in _GUIDED if getattr(self, name) is not None]

    @model_validator(mode="after")
    def _one_structure(self) -> SamplingRequest:
        guided = self._guided()
        if len(guided) + (self.structured_outputs is not None) > 1:
            raise conflict(guided[-1], "give the output one structure: structured_outputs "
                            "or one of " + ", ".join(_GUIDED))
        return self

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise conflict("stream_options", "stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Every chunk carries the usage so far (vLLM's, with include_usage only)."""
        options = self.stream_options
        return options is not None and options.include_usage and options.continuous_usage_stats


# apply_chat_template's own arguments, which chat_template_kwargs may not set
_TEMPLATE_ARGUMENTS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


class ChatTemplateOptions(StrictModel):
    """How the chat template renders a request's messages (vLLM's extensions to OpenAI's
    chat request): after the last message, the prompt of the assistant's turn
    (`add_generation_prompt`), or nothing, leaving the last message open for the reply to
    continue (`continue_final_message`: an assistant message the reply completes); and
    more variables for the template (`chat_template_kwargs`, e.g. `{"enable_thinking":
    false}` for templates that read one)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_ending(self) -> ChatTemplateOptions:
        if self.add_generation_prompt and self.continue_final_message:
            raise conflict("continue_final_message", "continue_final_message leaves the "
                            "last message open: send add_generation_prompt false with it")
        taken = sorted(set(self.chat_template_kwargs or {}) & _TEMPLATE_ARGUMENTS)
        if taken:
            raise conflict("chat_template_kwargs", f"chat_template_kwargs may not set "
                            f"{taken}: they are the request's own fields")
        return self

    def template_options(self) -> dict[str, Any]:
        """Keyword arguments for `apply_chat_template` beside the messages and tools."""
        options: dict[str, Any] = {"add_generation_prompt": self.add_generation_prompt}
        if self.continue_final_message:
            options["continue_final_message"] = True
        return {**options, **(self.chat_template_kwargs or {})}


class ChatCompletionRequest(SamplingRequest, ChatTemplateOptions):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    prediction: Prediction | None = None

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """{"type": "text" | "json_object"}, or {"type": "json_schema", "json_schema":
        {"name": ..., "schema": {...}, "strict": ..., "description": ...}}."""
        if value is None:
            return value
        kind = value.get("type")
        if kind in ("text", "json_object"):
            if set(value) != {"type"}:
                raise ValueError(f"response_format of type {kind!r} takes no other field")
        elif kind == "json_schema":
            spec = value.get("json_schema")
            if (set(value) != {"type", "json_schema"} or not isinstance(spec, dict)
                    or not isinstance(spec.get("schema", {}), dict)
                    or set(spec) - {"name", "schema", "strict", "description"}):
                raise ValueError("response_format json_schema takes {'json_schema': {'name': "
                                 "..., 'schema': {...}, 'strict': ..., 'description': ...}}")
        else:
            raise ValueError(f"response_format type {kind!r} is not supported; use 'text', "
                             "'json_object' or 'json_schema'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise conflict("top_logprobs", f"top_logprobs must be in [0, 20], got "
                                           f"{self.top_logprobs}")
        if self.top_logprobs is not None and not self.logprobs:
            raise conflict("top_logprobs", "top_logprobs requires logprobs to be true")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise conflict("max_completion_tokens",
                            "max_tokens and max_completion_tokens disagree; send one")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise conflict("tools", "tool function names must be unique")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not names:
            raise conflict("tool_choice", "tool_choice needs tools to choose from")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise conflict("tool_choice", f"tool_choice names {choice.function.name!r}, "
                            "which is not among the tools")
        if (choice not in (None, "none", "auto") and self.response_format is not None
                and self.response_format["type"] != "text"):
            raise conflict("response_format", "a required or named tool_choice fixes the "
                            "output's format already; drop response_format")
        if self.structure() and (choice not in (None, "none", "auto") or (
                self.response_format is not None and self.response_format["type"] != "text")):
            raise conflict("structured_outputs", "the output has one structure: "
                            "structured_outputs (or guided_*) does not combine with "
                            "response_format or a required or named tool_choice")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def json_schema(self) -> str | None:
        """The JSON schema the output must follow (`SamplingParams.json_schema`), as JSON
        text; None for free text. json_object is any object; a json_schema without a
        schema, any JSON value."""
        fmt = self.response_format or {"type": "text"}
        if fmt["type"] == "json_object":
            return '{"type": "object"}'
        if fmt["type"] == "json_schema":
            return json.dumps(fmt["json_schema"].get("schema", {}))
        return None


class CompletionRequest(SamplingRequest):
    """POST /v1/completions. `prompt` is a string, strings, token ids, or lists of token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    """Text after the completion: the model fills in the middle (`server.api.infill`)."""

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(isinstance(v, list) and not v for v in value)):
            raise ValueError("prompt must not be empty")
        return value

    @model_validator(mode="after")
    def _suffix_without_echo(self) -> CompletionRequest:
        if self.suffix is not None and self.echo:
            raise conflict("suffix", "echo and suffix do not combine (the echoed prompt would "
                                     "not show where the completion goes)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        return prompt_list(self.prompt)


def prompt_list(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A prompt field (a string, strings, token ids or lists of token ids) as a list of
    prompts, each a string or a list of token ids."""
    if isinstance(value, str):
        return [value]
    if all(isinstance(v, int) for v in value):
        return [list(value)]  # type: ignore[arg-type]
    return list(value)  # type: ignore[arg-type]


class TokenizeRequest(ChatTemplateOptions):
    """POST /tokenize: a prompt string, or chat messages (and tools) rendered with the chat
    template, as a chat completion's prompt is."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise conflict("prompt", "send exactly one of prompt or messages")
        if self.tools is not None and self.messages is None:
            raise conflict("tools", "tools go with messages")
        return self


class DetokenizeRequest(StrictModel):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]
