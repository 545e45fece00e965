"""Fill-in-the-middle: OpenAI completions' `suffix` (llama.cpp's /infill). A code model
trained for it is prompted with its own tokens around the text before and after the gap,
prefix first (PSM: `<prefix> before <suffix> after <middle>`), and generates the middle,
which ends at its end-of-text or one of its file-boundary tokens. The tokens are found in
the tokenizer's vocabulary, by the names of the families that use them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

_FAMILIES = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, StarCoder2, Granite code
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),  # CodeLlama (SentencePiece pieces)
    ("<PRE>", "<SUF>", "<MID>"),
)
"""(prefix, suffix, middle) token names, by model family."""

_ENDS = ("<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<fim_pad>",
         "<file_sep>", "<|end_of_text|>", "<EOT>", "▁<EOT>", "<｜end▁of▁sentence｜>")
"""Tokens that end a middle where the vocabulary has them: end of text (a base model's,
where an instruct model's end of sequence is its chat turn's end), padding, and the
boundaries of the next file."""


@dataclass(frozen=True)
class InfillTokens:
    """A tokenizer's fill-in-the-middle tokens."""

    prefix: int
    suffix: int
    middle: int
    leading: tuple[int, ...]
    """The special tokens the tokenizer puts before a text (a BOS), put before the prefix."""
    ends: tuple[int, ...]
    """Tokens that end the middle (stop tokens, besides the model's end of sequence)."""

    def prompt(self, tokenizer: Any, before: str | list[int], after: str) -> list[int]:
        """The prompt of a gap between `before` (text or token ids) and `after`."""
        head = before if isinstance(before, list) else tokenizer.encode(
            before, add_special_tokens=False)
        tail = tokenizer.encode(after, add_special_tokens=False)
        return [*self.leading, self.prefix, *head, self.suffix, *tail, self.middle]


@lru_cache(maxsize=4)
def infill_tokens(tokenizer: Any) -> InfillTokens | None:
    """The tokenizer's fill-in-the-middle tokens, or None where its vocabulary has none."""
    vocab = tokenizer.get_vocab()
    family = next((f for f in _FAMILIES if all(name in vocab for name in f)), None)
    if family is None:
        return None
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    leading = next((full[:i] for i in range(len(full) - len(plain) + 1)
                    if full[i:i + len(plain)] == plain), [])
    return InfillTokens(*(vocab[name] for name in family), tuple(leading),
                        tuple(vocab[name] for name in _ENDS if name in vocab))
