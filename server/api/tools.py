"""Tool calling for chat completions: which mode a request is in, the JSON schema that
constrains a forced call, and reading calls out of generated text.

- ``none``: no tools, or `tool_choice: "none"`; the tools are not shown to the template.
- ``named`` (`tool_choice: {"type": "function", "function": {"name": ...}}`): the output is
  constrained to that function's `parameters` schema, so the generated text is the call's
  arguments; any model can be forced this way.
- ``required``: the output is constrained to a JSON array of `{"name", "arguments"}` calls
  (one, unless `parallel_tool_calls`), each matching its function's schema.
- ``auto`` (the default when tools are given): the model decides, as its chat template
  taught it. Calls are read back from templates that write them as `<tool_call>{"name":
  ..., "arguments": ...}</tool_call>` (Hermes style: Qwen2.5 and many others), as a bare
  `{"name": ..., "parameters": ...}` (Llama 3.1-3.3, maybe after `<|python_tag|>`), as
  `[TOOL_CALLS]` and a list of calls (Mistral's) or as `<|tool_call|>` and a list of calls
  (Granite 3's); for any
  other template "auto" is refused, as vLLM refuses it without a tool-call parser. Small
  models taught the tags often drop them (Qwen2.5-Coder-0.5B answers a bare `{"name": ...,
  "arguments": ...}`), so a reply that is nothing but such an object, or a list of them,
  naming the request's tools, is read as calls whatever the template.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from server.api.errors import bad_request
from server.api.protocol import ChatCompletionRequest

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_CALLS, GRANITE_CALLS = "[TOOL_CALLS]", "<|tool_call|>"
# what may open a bare call in text kept with its special tokens (auto mode keeps them)
CALL_PREFIXES = (MISTRAL_CALLS, GRANITE_CALLS, "<|python_tag|>")
_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolMode:
    """How a request's output relates to its tools (see the module docs)."""

    kind: str  # "none" | "auto" | "required" | "named"
    name: str | None = None  # the named function
    names: tuple[str, ...] = ()  # every tool's (auto: what a bare call may name)

    @property
    def constrained(self) -> bool:
        return self.kind in ("required", "named")


NO_TOOLS = ToolMode("none")


def template_reads_calls(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template teaches tool calls in a form `read_calls`
    reads: in `<tool_call>` tags, after `[TOOL_CALLS]` or `<|tool_call|>`, or (a template
    that shows tools and asks for "parameters", as Llama 3.1's) a bare JSON object."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: any of them
        template = " ".join(str(t) for t in template.values())
    if not isinstance(template, str):
        return False
    return (CALL_OPEN in template or MISTRAL_CALLS in template or GRANITE_CALLS in template
            or ("tools" in template and '"parameters"' in template))


def tool_mode(req: ChatCompletionRequest, tokenizer: Any) -> ToolMode:
    """The request's mode; 400 for "auto" where the template's calls cannot be read."""
    choice = req.tool_choice
    if not req.tools or choice == "none":
        return NO_TOOLS
    if choice == "required":
        return ToolMode("required")
    if choice is not None and choice != "auto":
        return ToolMode("named", choice.function.name)
    if not template_reads_calls(tokenizer):
        raise bad_request(
            "tool_choice 'auto' needs a chat template that writes tool calls in <tool_call> "
            "tags, after [TOOL_CALLS] or <|tool_call|>, or as JSON with \"parameters\", and "
            "this model's does "
            "not; use tool_choice 'required' or a named function, which constrain the output "
            "to a call", param="tool_choice",
            code="invalid_value")
    return ToolMode("auto", names=tuple(t.function.name for t in req.tools))


def _parameters(req: ChatCompletionRequest, name: str) -> dict[str, Any]:
    function = next(t.function for t in req.tools or [] if t.function.name == name)
    return function.parameters if function.parameters is not None else {"type": "object"}


def call_schema(req: ChatCompletionRequest, mode: ToolMode) -> str | None:
    """The JSON schema (as text) the output must follow in a constrained mode, else None."""
    if mode.kind == "named":
        return json.dumps(_parameters(req, mode.name or ""))
    if mode.kind != "required":
        return None
    calls = [{"type": "object", "additionalProperties": False,
              "required": ["name", "arguments"],
              "properties": {"name": {"const": t.function.name},
                             "arguments": _parameters(req, t.function.name)}}
             for t in req.tools or []]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not req.parallel_tool_calls:
        schema["maxItems"] = 1
    return json.dumps(schema)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def new_call(name: str, arguments: str) -> dict[str, Any]:
    """An OpenAI `tool_calls` entry."""
    return {"id": call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def read_calls(text: str, mode: ToolMode) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a finished choice's text. What cannot be read as calls stays
    content: a constrained output cut short by max_tokens, or a `<tool_call>` whose body is
    not a JSON object with a name."""
    if mode.kind == "named":
        return None, [new_call(mode.name or "", text)]
    if mode.kind == "required":  # (the schema's array of calls, unless cut short)
        try:
            return None, [new_call(c["name"], _arguments(c["arguments"]))
                          for c in json.loads(text)]
        except (json.JSONDecodeError, KeyError, TypeError):
            return text, []
    if mode.kind != "auto":
        return text, []
    if CALL_OPEN not in text:
        return _bare_calls(text, mode.names)
    calls, kept, last = [], [], 0
    for match in _CALL.finditer(text):
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append(new_call(body["name"], _arguments(body.get("arguments", {}))))
    content = ("".join(kept) + text[last:]).strip() if calls else text
    return content or None, calls


def _bare_calls(text: str, names: tuple[str, ...]) -> tuple[str | None, list[dict[str, Any]]]:
    """A reply that is only a call object, or a list of them (maybe after Mistral's
    `[TOOL_CALLS]`, Granite's `<|tool_call|>` or Llama's `<|python_tag|>`), naming the request's tools (the arguments
    under "arguments", or Llama 3's "parameters", which may add "type": "function"); else
    the text as content."""
    calls = _without_prefix(text)
    try:
        body = json.loads(calls) if maybe_bare_call(calls) else None
    except json.JSONDecodeError:
        body = None
    items = body if isinstance(body, list) else [body]
    if not body or not all(isinstance(c, dict) and c.get("name") in names
                           and set(c) <= {"name", "arguments", "parameters", "type"}
                           and c.get("type", "function") == "function" for c in items):
        return text, []
    return None, [new_call(c["name"], _arguments(c.get("arguments", c.get("parameters", {}))))
                  for c in items]


def _without_prefix(text: str) -> str:
    """`text` less leading space and one of `CALL_PREFIXES`."""
    text = text.lstrip()
    for prefix in CALL_PREFIXES:
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def maybe_bare_call(text: str) -> bool:
    """Whether `text` could be (the start of) a bare call: it opens a JSON object or list,
    maybe after one of `CALL_PREFIXES`, or is the start of one of those."""
    start = text.lstrip()
    return (_without_prefix(text)[:1] in ("{", "[")
            or any(p.startswith(start) for p in CALL_PREFIXES if start))


def held_back(text: str, tag: str = CALL_OPEN) -> int:
    """How many characters at the end of streamed `text` could begin `tag` (auto mode holds
    those of `<tool_call>` until the next text shows which)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0
