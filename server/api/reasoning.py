"""Reasoning output (`--reasoning-parser`, as vLLM's): the thinking a reasoning model writes
between `<think>` and `</think>` (Qwen3; DeepSeek-R1 distills and QwQ, whose templates open
`<think>` in the prompt), split from the answer after it. Chat replies carry it as
`message.reasoning` (streamed: `delta.reasoning`), the answer as the content; the tags
appear in neither. The text before `</think>`, less a leading `<think>`, is the reasoning;
the text after it, less leading newlines, the content (null if empty). The parsers differ in
an output without `</think>`:

- ``qwen3``: the content, as with `chat_template_kwargs: {"enable_thinking": false}`, where
  the template closes the thinking in the prompt; reasoning where the output opened with
  `<think>` (a reply cut short while thinking).
- ``deepseek_r1``: the reasoning, since its templates open `<think>` in the prompt.

Streamed (`ReasoningStream`), a qwen3 output that did not open with `<think>` goes out as
content until a `</think>` (as vLLM's qwen3 parser streams it): the text before it cannot be
told from an answer while it comes, and is sent by then. Whole, that text is reasoning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.api.tools import held_back

if TYPE_CHECKING:
    from server.api.generation import ChoiceResult

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _opened(text: str) -> int | None:
    """Where the text after a leading `<think>` (whitespace before it allowed) begins; None
    where the text does not open with one."""
    start = len(text) - len(text.lstrip())
    return start + len(THINK_OPEN) if text.startswith(THINK_OPEN, start) else None


@dataclass(frozen=True)
class ReasoningParser:
    """One `--reasoning-parser` (see the module docs)."""

    name: str
    unclosed_is_reasoning: bool
    """What an output that neither opens with `<think>` nor writes `</think>` is: reasoning
    (the template opened the thinking in the prompt), or the content."""

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a finished output; None for a part it does not have."""
        opened = _opened(text)
        body = text if opened is None else text[opened:]
        reasoning, closed, answer = body.partition(THINK_CLOSE)
        if closed:
            return reasoning, answer.lstrip("\n") or None
        if opened is not None or self.unclosed_is_reasoning:
            return body, None
        return None, text

    def stream(self) -> ReasoningStream:
        """A splitter for one streamed output."""
        return ReasoningStream(self)

    def reasoning_tokens(self, pieces: list[str], step_tokens: list[int]) -> int:
        """The tokens of a finished output that went to its reasoning, `usage`'s
        `reasoning_tokens`: those of the output steps (each a text piece and its token count)
        up to the one whose text closes the thinking (with speculation, that step counts
        whole: a few answer tokens may count as reasoning); every token of an output that
        `split` finds all reasoning; none of one with no reasoning."""
        text = "".join(pieces)
        opened = _opened(text)
        start = opened or 0
        close = text.find(THINK_CLOSE, start)
        if close < 0:
            return sum(step_tokens) if opened is not None or self.unclosed_is_reasoning else 0
        end, seen, count = close + len(THINK_CLOSE), 0, 0
        for piece, tokens in zip(pieces, step_tokens, strict=True):
            if seen >= end:
                break
            seen, count = seen + len(piece), count + tokens
        return count


REASONING_PARSERS = {p.name: p for p in (ReasoningParser("qwen3", False),
                                         ReasoningParser("deepseek_r1", True))}


def with_reasoning_tokens(usage: dict[str, Any], parser: ReasoningParser | None,
                          results: Sequence[ChoiceResult]) -> dict[str, Any]:
    """`usage` with `completion_tokens_details.reasoning_tokens` over every choice, as
    OpenAI reports it, where a parser splits the reasoning off; as it is without one."""
    if parser is None:
        return usage
    count = sum(parser.reasoning_tokens(r.text, r.step_tokens) for r in results)
    return {**usage, "completion_tokens_details": {"reasoning_tokens": count}}


class ReasoningStream:
    """One streamed output split as it comes. States: "start" (whether it opens with
    `<think>` is not known yet: the text so far is blank or the start of the tag, and is
    held), "reasoning" (before `</think>`), "unsure" (qwen3's unopened output, streamed as
    content, which a `</think>` may still end) and "answer" (after `</think>`)."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.text = ""
        self.done = 0  # characters of `text` sent or dropped (tags, leading newlines)
        self.state = "start"
        self.answered = False  # whether any of the answer after `</think>` was sent

    def feed(self, new_text: str, finished: bool) -> tuple[str, str]:
        """The (reasoning, content) pieces of the text so far that can go out now: all of
        it once `finished`; before, less the end that could begin a tag."""
        self.text += new_text
        if self.state == "start":
            self._open(finished)
        if self.state in ("reasoning", "unsure"):
            thinking = self.state == "reasoning"
            end = self.text.find(THINK_CLOSE, self.done)
            if end >= 0:
                piece = self.text[self.done:end]
                self.done, self.state = end + len(THINK_CLOSE), "answer"
                answer = self._answer()
                return (piece, answer) if thinking else ("", piece + answer)
            stop = len(self.text) if finished else \
                len(self.text) - held_back(self.text[self.done:], THINK_CLOSE)
            piece, self.done = self.text[self.done:stop], stop
            return (piece, "") if thinking else ("", piece)
        if self.state == "answer":
            return "", self._answer()
        return "", ""

    def _open(self, finished: bool) -> None:
        opened = _opened(self.text)
        if opened is not None:
            self.done, self.state = opened, "reasoning"
        elif finished or not THINK_OPEN.startswith(self.text.lstrip()):
            self.state = "reasoning" if self.parser.unclosed_is_reasoning else "unsure"

    def _answer(self) -> str:
        piece, self.done = self.text[self.done:], len(self.text)
        if not self.answered:
            piece = piece.lstrip("\n")
            self.answered = bool(piece)
        return piece
