"""Chat messages as requests carry them: roles, text content (a string or text parts),
an assistant's tool calls and reasoning, a tool's answer; and OpenAI's predicted output."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator, model_validator

from server.api.protocol_base import StrictModel, conflict
from server.api.protocol_tools import ToolCall


class ChatMessage(StrictModel):
    """One chat message; content is a string or a list of text parts. An assistant message
    may carry the tool calls it made and its reasoning (a reply's `reasoning`, sent back),
    and a "tool" message answers one of them."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None
    """(assistant) Given to the template as `reasoning` and `reasoning_content` (the name
    Qwen3's template reads), as vLLM does."""

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise conflict("tool_calls", "only assistant messages carry tool_calls")
        if self.reasoning is not None and self.role != "assistant":
            raise conflict("reasoning", "only assistant messages carry reasoning")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise conflict("tool_call_id", "a tool message needs the tool_call_id it answers, "
                            "and only tool messages take one")
        return self

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: str | list[dict[str, Any]] | None) -> str | None:
        if not isinstance(value, list):
            return value
        if not value:  # (as OpenAI: an array of at least one part)
            raise ValueError("content as a list of parts takes at least one part")
        texts = []
        for part in value:
            kind = part.get("type")
            if kind != "text":
                raise ValueError(f"content part type {kind!r} is not supported; only 'text'")
            extra = sorted(set(part) - {"type", "text"})
            if extra or not isinstance(part.get("text"), str):
                raise ValueError(f"a text content part takes a string 'text' only, got keys {sorted(part)}")
            texts.append(part["text"])
        return "".join(texts)

    def as_template_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [c.as_template_dict() for c in self.tool_calls]
        if self.reasoning is not None:
            message["reasoning"] = message["reasoning_content"] = self.reasoning
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class Prediction(StrictModel):
    """OpenAI's predicted output: text the reply is expected to hold (a file to be sent back
    with small edits), as a string or text parts."""

    type: Literal["content"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content)
