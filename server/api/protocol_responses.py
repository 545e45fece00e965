"""Request models of POST /v1/responses (OpenAI's Responses API), which becomes the chat
request it amounts to (`ResponsesRequest.to_chat`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from server.api.protocol import ChatCompletionRequest
from server.api.protocol_base import OpenAIBookkeeping, StrictModel, conflict

LOGPROBS = "message.output_text.logprobs"
"""The one `include` value served: the output text's token logprobs."""


class ResponseTextFormat(StrictModel):
    """The Responses API's `text.format`: plain text, any JSON object, or JSON following a
    schema (`json_schema`: name, schema, strict, description)."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseText(StrictModel):
    format: ResponseTextFormat | None = None


class ResponseInputMessage(StrictModel):
    """An input item of the Responses API: a message, its content a string or a list of
    text parts (`input_text`, or `output_text` in an assistant message fed back)."""

    type: Literal["message"]
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]
    id: str | None = None
    status: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: str | list[dict[str, Any]]) -> str:
        if isinstance(value, str):
            return value
        texts = []
        for part in value:
            kind = part.get("type")
            if kind not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
                raise ValueError(f"content part type {kind!r} is not supported; only "
                                 "'input_text' and 'output_text' with a string 'text'")
            texts.append(part["text"])
        return "".join(texts)


class ResponseFunctionCall(StrictModel):
    """An input item: a function call the model made earlier in the conversation."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class ResponseFunctionCallOutput(StrictModel):
    """An input item: what a function call returned."""

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


class ResponseReasoningItem(StrictModel):
    """An input item: the reasoning of an earlier reply (served with a reasoning parser),
    fed back; the template gets its text as the next assistant message's `reasoning`."""

    type: Literal["reasoning"]
    content: list[dict[str, Any]] | None = None
    summary: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None
    id: str | None = None
    status: str | None = None

    @field_validator("content")
    @classmethod
    def _reasoning_text_parts(cls, value: list[dict[str, Any]] | None
                              ) -> list[dict[str, Any]] | None:
        for part in value or []:
            if part.get("type") != "reasoning_text" or not isinstance(part.get("text"), str):
                raise ValueError("a reasoning item's content parts are {'type': "
                                 "'reasoning_text', 'text': ...}")
        return value

    @property
    def text(self) -> str:
        return "".join(part["text"] for part in self.content or [])


ResponseInputItem = Annotated[
    ResponseInputMessage | ResponseFunctionCall | ResponseFunctionCallOutput
    | ResponseReasoningItem, Field(discriminator="type")]


class ResponseFunctionTool(StrictModel):
    """A function tool, in the Responses API's flat shape."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseNamedToolChoice(StrictModel):
    type: Literal["function"]
    name: str


class ResponsesRequest(OpenAIBookkeeping):
    """POST /v1/responses (OpenAI's Responses API) for text and function calls: `input` is
    a string (one user message) or a list of messages, earlier function calls and their
    outputs; `instructions` a system message before them. It becomes a chat request
    (`to_chat`), after the conversation of `previous_response_id` where one is named
    (`server.api.response_store`)."""

    model: str | None = None
    input: list[ResponseInputItem]
    """(a string is one user message, an item without a type a message: `_items`)"""
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    priority: int = 0
    """vLLM's (as chat's): with --scheduling-policy priority, lower runs first."""
    """(an extension, as vLLM's)"""
    stream: bool = False
    text: ResponseText | None = None
    store: bool | None = None
    """Keep the response for `previous_response_id` and GET /v1/responses/{id} (unset:
    yes, as OpenAI; the server's --max-stored-responses bounds how many)."""
    metadata: dict[str, str] | None = None
    user: str | None = None
    previous_response_id: str | None = None
    tools: list[ResponseFunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponseNamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["disabled", "auto"] | None = None
    """auto: where the conversation does not fit the context, its earliest items are left
    out (`conversation`); disabled (the default): a 400."""
    include: list[str] | None = None
    """(only LOGPROBS: the output text's token logprobs)"""
    top_logprobs: int | None = None
    """Alternatives listed at each output token (0-20; given alone it asks for logprobs)."""
    reasoning: dict[str, Any] | None = None

    @field_validator("max_output_tokens")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_output_tokens must be >= 1, got {value}")
        return value

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [{"type": "message", "role": "user", "content": value}]
        if isinstance(value, list):  # (the API lets a message leave out its type)
            return [{"type": "message", **item} if isinstance(item, dict) and "type" not in item
                    else item for item in value]
        return value

    @model_validator(mode="after")
    def _supported(self) -> ResponsesRequest:
        unknown = [item for item in self.include or [] if item != LOGPROBS]
        if unknown:
            raise conflict("include", f"include {unknown[0]!r} is not supported (only "
                                      f"{LOGPROBS!r})")
        if self.reasoning:
            raise conflict("reasoning", "reasoning options are not supported")
        if not self.input:
            raise conflict("input", "input must not be empty")
        return self

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS in (self.include or []) or self.top_logprobs is not None

    def _messages(self, items: Sequence[ResponseInputItem]) -> list[dict[str, Any]]:
        """The conversation as chat messages: function calls are the tool_calls of the
        assistant message before them (one made for them if there is none), each output a
        tool message; reasoning goes with the assistant message after it (left out where
        none follows)."""
        messages: list[dict[str, Any]] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
        reasoning: dict[str, str] = {}  # (that of the assistant message to come)
        for item in items:
            if isinstance(item, ResponseReasoningItem):
                reasoning = {"reasoning": item.text}
                continue
            if isinstance(item, ResponseInputMessage):
                messages.append({"role": item.role, "content": item.content,
                                 **(reasoning if item.role == "assistant" else {})})
            elif isinstance(item, ResponseFunctionCall):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if messages and messages[-1]["role"] == "assistant" and not reasoning:
                    messages[-1].setdefault("tool_calls", []).append(call)  # (the same turn)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call],
                                     **reasoning})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id,
                                 "content": item.output})
            reasoning = {}
        return messages

    def conversation(self, earlier: Sequence[ResponseInputItem], drop: int = 0
                     ) -> list[ResponseInputItem]:
        """The `earlier` items of the conversation this request continues, then its input,
        less the first `drop` (and any function call outputs those leave first, as their
        calls went)."""
        items = [*earlier, *self.input][drop:]
        while drop and items and isinstance(items[0], ResponseFunctionCallOutput):
            items.pop(0)
        return items

    def to_chat(self, items: Sequence[ResponseInputItem]) -> ChatCompletionRequest:
        """The chat request this one asks for over the conversation `items`
        (`conversation`; its validation errors name chat's fields)."""
        body: dict[str, Any] = {"messages": self._messages(items), "max_tokens": self.max_output_tokens,
                                "temperature": self.temperature, "top_p": self.top_p,
                                "seed": self.seed, "priority": self.priority}
        if self.wants_logprobs:
            body |= {"logprobs": True, "top_logprobs": self.top_logprobs}
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type != "text":
            body["response_format"] = (
                {"type": "json_object"} if fmt.type == "json_object" else
                {"type": "json_schema", "json_schema": {"name": fmt.name or "output",
                                                        "schema": fmt.schema_ or {}}})
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(
                exclude={"type", "strict"}, exclude_none=True)} for t in self.tools]
        choice = self.tool_choice
        if isinstance(choice, ResponseNamedToolChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        elif choice is not None:
            body["tool_choice"] = choice
        if self.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = self.parallel_tool_calls
        return ChatCompletionRequest.model_validate(body)
