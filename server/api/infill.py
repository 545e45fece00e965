"""Fill-in-the-middle: OpenAI completions' `suffix` and llama.cpp's /infill. A code model
trained for it is prompted with its own tokens around the text before and after the gap,
prefix first (PSM: `<prefix> before <suffix> after <middle>`), and generates the middle,
which ends at its end-of-text or one of its file-boundary tokens. The tokens are found in
the tokenizer's vocabulary, by the names of the families that use them.

/infill also sends other files' text (`input_extra`), which goes before the prefix: as
Qwen2.5-Coder's repository-level format where the vocabulary has its tokens
(`<|repo_name|>name`, then `<|file_sep|>path` + text for each file, the last naming the
file being completed), else each file after a plain-text separator, as llama.cpp does."""

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

_REPOSITORY = (("<|repo_name|>", "<|file_sep|>"), ("<reponame>", "<file_sep>"))
"""(repository name, file separator) token names: Qwen2.5-Coder's, StarCoder's."""
_SNIPPET = "\n\n--- snippet ---\n\n"
"""Before each file's text where the vocabulary has no file separator (llama.cpp's)."""

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
    repository: tuple[int, int] | None = None
    """The (repository name, file separator) tokens, where the vocabulary has them."""

    def prompt(self, tokenizer: Any, before: str | list[int], after: str) -> list[int]:
        """The prompt of a gap between `before` (text or token ids) and `after`."""
        head = before if isinstance(before, list) else tokenizer.encode(
            before, add_special_tokens=False)
        tail = tokenizer.encode(after, add_special_tokens=False)
        return [*self.leading, self.prefix, *head, self.suffix, *tail, self.middle]

    def with_context(self, tokenizer: Any, before: str, typed: str, after: str,
                     files: list[tuple[str, str]], window: int, room: int
                     ) -> tuple[list[int], bool]:
        """llama.cpp's /infill prompt: `files` ((path, text) each, the most relevant last)
        as context, then the gap between `before` + `typed` (the current line so far) and
        `after`. The prefix keeps its last 3/4 of `window` tokens, the suffix its first
        1/4 less `typed`'s and the markers'; the context at most `room` tokens: the last
        files whole, the one before them its text's end (after its own path). Returns the
        prompt and whether anything was cut."""
        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False) if text else []

        head, line, tail = encode(before), encode(typed), encode(after)
        keep_head = min(len(head), 3 * window // 4)
        keep_tail = min(len(tail), max(0, window // 4 - 2 - len(line)))
        context, cut = self._context(encode, files, room)
        cut = cut or (keep_head, keep_tail) != (len(head), len(tail))
        return [*self.leading, *context, self.prefix, *head[len(head) - keep_head:], *line,
                self.suffix, *tail[:keep_tail], self.middle], cut

    def _context(self, encode: Any, files: list[tuple[str, str]], room: int
                 ) -> tuple[list[int], bool]:
        """Other files' tokens within `room` (the last ones first), and whether any were
        left out: with the repository tokens between the repository's header and the
        current file's separator, each after its separator and path; else each after the
        plain-text separator."""
        if not files:
            return [], False
        if self.repository is not None:
            repo, sep = self.repository
            first, last = [repo, *encode("myproject\n")], [sep, *encode("filename\n")]
            blocks = [([sep, *encode(path + "\n")], encode(text)) for path, text in files]
        else:
            first, last = [], []
            blocks = [(encode(_SNIPPET), encode(text)) for _, text in files]
        left = room - len(first) - len(last)
        kept: list[int] = []
        for marker, text in reversed(blocks):
            take = min(len(text), left - len(marker))
            if take <= 0:
                break
            kept = [*marker, *text[len(text) - take:], *kept]
            left -= len(marker) + take
            if take < len(text):
                break
        whole = sum(len(m) + len(t) for m, t in blocks)
        if not kept:
            return [], True
        return [*first, *kept, *last], len(kept) < whole


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
    repository = next(((vocab[a], vocab[b]) for a, b in _REPOSITORY
                       if a in vocab and b in vocab), None)
    return InfillTokens(*(vocab[name] for name in family), tuple(leading),
                        tuple(vocab[name] for name in _ENDS if name in vocab), repository)
