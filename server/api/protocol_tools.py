"""Tool request models of the chat API: function tools, a named tool_choice, and the calls an
earlier assistant message made."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from server.api.protocol_base import StrictModel


class FunctionDefinition(StrictModel):
    """A tool's function: its name and the JSON schema of its arguments."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    """`tool_choice` naming the function the reply must call."""

    type: Literal["function"]
    function: FunctionName


class FunctionCall(StrictModel):
    name: str
    arguments: str
    """JSON text, as the API returns it."""


class ToolCall(StrictModel):
    """A call an earlier assistant message made (sent back in the conversation)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def as_template_dict(self) -> dict[str, Any]:
        """Chat templates take the arguments as a mapping (transformers' convention)."""
        try:
            arguments: Any = json.loads(self.function.arguments)
        except json.JSONDecodeError:
            arguments = self.function.arguments
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": arguments}}
