"""Structured output: a request whose text must follow a structure is sampled from logits
masked to the tokens that keep its output a prefix of such text, through xgrammar's grammar
matchers (an optional dependency: `pip install leapfrog[structured]`). The structures
(`SamplingParams.structured`): JSON (OpenAI's `response_format` of type `json_object`, or
`json_schema` with a schema), a regular expression, one of given texts, or an EBNF grammar
(vLLM's `structured_outputs`).

The mask is applied on the host, where the request's other logit adjustments are
(`server.engine.sampler.processed_logits`): its steps leave the device's greedy and sampling
paths. A step that verifies drafts masks each row with what the grammar allows after the
drafts before it (`mask_rows`), so verification stays exact. Each token the request keeps
advances its matcher (`Scheduler._append_tokens`); once the structure is complete only the
end-of-sequence token is allowed.
"""

from __future__ import annotations

import json
from typing import Any

import torch


class Grammars:
    """An engine's compiled grammars, by structure, over its tokenizer; xgrammar is
    imported with the first one."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._compiler: Any = None
        self._compiled: dict[tuple[str, str], Any] = {}

    def matcher(self, kind: str, spec: str) -> Any:
        """A fresh matcher (`xgrammar.GrammarMatcher`) for outputs that follow a structure
        (`SamplingParams.structured`): kind json_schema (spec: the schema as JSON text),
        regex, choice (the texts as a JSON list) or grammar (EBNF). A spec xgrammar cannot
        take, or xgrammar missing, is a ValueError."""
        compiled = self._compiled.get((kind, spec))
        if compiled is None:
            compiled = self._compile(kind, spec)
            self._compiled[kind, spec] = compiled
        import xgrammar

        return xgrammar.GrammarMatcher(compiled)

    def _compile(self, kind: str, spec: str) -> Any:
        if kind == "json_schema":
            try:
                parsed = json.loads(spec)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the JSON schema is not JSON: {exc}") from exc
            if not isinstance(parsed, dict):
                raise ValueError("the JSON schema must be a JSON object")
        compiler = self._compiler_for()
        try:
            if kind == "json_schema":
                return compiler.compile_json_schema(spec)
            if kind == "regex":
                return compiler.compile_regex(spec)
            if kind == "choice":  # one literal each, escaped as JSON strings are
                texts = [json.dumps(t, ensure_ascii=False) for t in json.loads(spec)]
                return compiler.compile_grammar("root ::= " + " | ".join(texts))
            return compiler.compile_grammar(spec)
        except RuntimeError as exc:  # xgrammar's error, after a time and source location
            reason = str(exc).strip().rsplit(".cc:", 1)[-1].split(": ", 1)[-1]
            what = "JSON schema" if kind == "json_schema" else kind
            raise ValueError(f"unsupported {what}: {reason}") from exc

    def _compiler_for(self) -> Any:
        if self._compiler is None:
            try:
                import xgrammar
            except ImportError as exc:
                raise ValueError("structured output (response_format json_object or "
                                 "json_schema, structured_outputs) needs xgrammar: pip "
                                 "install 'leapfrog[structured]'") from exc
            info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer,
                                                           vocab_size=self.vocab_size)
            self._compiler = xgrammar.GrammarCompiler(info)
        return self._compiler


def mask_rows(matcher: Any, scores: torch.Tensor, drafts: list[int]) -> torch.Tensor:
    """A copy of a verification step's logits [len(drafts) + 1, V] with, in row j, every
    token at -inf that the matcher refuses after drafts[:j]. The drafts are taken in and
    then given back (the matcher ends as it began). Rows after a draft the grammar refuses
    are left unmasked: verification rejects that draft (its row gives it no probability),
    so they are never read; nor are rows after an end-of-sequence draft, where the reply
    ends."""
    import xgrammar

    masked = scores.clone()
    mask = xgrammar.allocate_token_bitmask(1, scores.shape[-1])
    taken = 0
    for j in range(len(drafts) + 1):
        matcher.fill_next_token_bitmask(mask)
        xgrammar.apply_token_bitmask_inplace(masked[j:j + 1], mask)
        if j == len(drafts) or not matcher.accept_token(drafts[j]):
            break
        taken += 1
        if matcher.is_terminated():  # (an end-of-sequence draft: the reply ends there)
            break
    if taken:
        matcher.rollback(taken)
    return masked
