"""The drafter interface and registry.

A drafter proposes up to k tokens for each running request; the engine verifies all
proposals with one batched forward of the target model (`drafters.verify`), so a drafter
can only change speed, never the output.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from server.models.batch import BatchMeta


class History(Sequence[int]):
    """A request's tokens read as one sequence without copying them: its prompt, its output
    so far and a step's new tokens, joined. A drafter reads the end of it each step (a
    copy of the whole would cost O(context) a request a step). It shows the request's lists
    as they are: read it during `propose`, do not keep it."""

    __slots__ = ("_parts", "_len")

    def __init__(self, *parts: Sequence[int]) -> None:
        self._parts = parts
        self._len = sum(map(len, parts))

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        return itertools.chain(*self._parts)

    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._len)
            if step != 1:
                return list(self)[index]
            out: list[int] = []
            offset = 0
            for part in self._parts:
                if start < offset + len(part) and stop > offset:
                    out.extend(part[max(start - offset, 0):stop - offset])
                offset += len(part)
            return out
        i = index + self._len if index < 0 else index
        if not 0 <= i < self._len:
            raise IndexError("History index out of range")
        *head, last = self._parts
        for part in head:
            if i < len(part):
                return part[i]
            i -= len(part)
        return last[i]


@dataclass
class DraftRequest:
    """One request to draft for."""

    request_id: str
    token_ids: Sequence[int]
    """Prompt plus every token generated so far; the last one is the newest token (the
    engine passes a `History`)."""
    max_draft_tokens: int
    """Propose at most this many tokens (>= 1)."""
    distribution: Callable[[torch.Tensor], torch.Tensor] | None = None
    """A sampled request's sampling distribution: logits over the target's vocabulary [V]
    -> probabilities [V] (temperature, top-k, top-p, min-p), for drafters that draw their
    drafts from it and report it as q (`Proposal.probs`); None for a greedy request."""
    generator: torch.Generator | None = None
    """The request's own generator (seeded requests), for such draws."""
    prediction: Sequence[int] = ()
    """Tokens the output is expected to hold (`SamplingParams.prediction`), for drafters
    that look drafts up in text (`drafters.ngram`)."""


@dataclass
class DraftBatch:
    """All requests that get drafts this step."""

    requests: list[DraftRequest]
    hidden_states: torch.Tensor | None = None
    """[num_requests, hidden]: the target's final hidden state at the token before each
    request's newest one (the state that predicted it), for drafters with
    `needs_hidden_states`; None otherwise."""
    forward: Callable[[list[int], torch.Tensor, int], torch.Tensor] | None = None
    """For drafters with `num_draft_layers`: forward(rows, tokens, offset) runs one token of
    each request in `rows` (indexes into `requests`; tokens [len(rows)]) at position
    (newest token's position + offset) through the target's first num_draft_layers layers,
    writing their KV, and returns the final-normed hidden states [len(rows), hidden]. The
    engine reserves the KV slots of the positions a request's drafts may take; verification
    overwrites them."""
    meta: Callable[[list[list[int]], list[int], list[int]], BatchMeta] | None = None
    """For drafters with a paged KV cache of their own (of the target's block size):
    meta(block_tables, positions, query_lens) -> the attention metadata of a flat batch of
    sequences with those block tables, query_lens[i] new tokens each, at `positions` (all
    rows, in order; a sequence's context ends at its last new token)."""


@dataclass
class Proposal:
    """A drafter's tokens for one request."""

    token_ids: list[int]
    """0..max_draft_tokens proposed tokens."""
    probs: torch.Tensor | None = None
    """[len(token_ids), vocab]: the draft distribution q each token was drawn from. None
    means the proposal is deterministic (treated as one-hot q by verification)."""


class Drafter(ABC):
    """Base class of every drafter.

    Invariants: `propose` returns exactly one `Proposal` per request, in order, each with at
    most `max_draft_tokens` tokens; it never mutates the batch. State a drafter keeps per
    request is dropped in `release`.
    """

    name: ClassVar[str]
    needs_hidden_states: ClassVar[bool] = False
    num_draft_layers: int = 0
    """The target's first layers the drafter runs its drafts through (`DraftBatch.forward`);
    0: none."""

    @abstractmethod
    def propose(self, batch: DraftBatch) -> list[Proposal]:
        """Propose draft tokens for every request in `batch`."""

    def release(self, request_id: str) -> None:  # noqa: B027 - optional hook
        """Forget per-request state (the request finished or was aborted)."""

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Allocate what drafting needs, once the target's KV caches exist (at start-up,
        so that a shortage of memory shows then, not at the first request)."""

    def kv_bytes_per_block(self, block_size: int, kv_dtype: torch.dtype) -> int:
        """Bytes of the drafter's own KV cache for each block of the target's pool (what
        `prepare` allocates), counted inside the engine's KV budget; 0: it keeps none."""
        return 0

    def check_tokenizer(self, tokenizer: Any) -> None:  # noqa: B027 - optional hook
        """Refuse (a ValueError that says why) a target whose tokenizer the drafter cannot
        draft for; drafters that draft from the target's own tokens take any."""

    def capture_graphs(self, batch_sizes: Sequence[int],  # noqa: B027 - optional hook
                       draft_lengths: Sequence[int]) -> None:
        """On CUDA, with the engine's graphs: capture whatever device work drafting does for
        up to max(batch_sizes) requests and max(draft_lengths) drafts, in those buckets (an
        eager launch costs the host ~10-20 us)."""

    def device_drafts(self) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None:
        """A function that drafts from device tensors alone, with no host sync: (features
        [N, hidden], the tokens after them [N], steps) -> drafts [N, steps], greedy and
        deterministic, each the first `steps` drafts `propose` would give with no early
        stop. The engine's verification graphs then draft each request's next step on the
        device (`server.engine.cuda_graphs`), so that the next verification step can be
        launched before the host has seen this one's tokens. None (the default): the
        drafter needs the host (history lookups, early stops)."""
        return None

    @classmethod
    def for_target(cls, model: torch.nn.Module, path: str | None) -> Drafter:
        """The drafter of an engine serving `model`; `path` names trained weights
        (`--speculative-model`), which only trained drafters take."""
        if path is not None:
            raise ValueError(f"drafter {cls.name!r} takes no trained weights "
                             f"(--speculative-model)")
        return cls()


D = TypeVar("D", bound=type[Drafter])
_REGISTRY: dict[str, type[Drafter]] = {}


def register_drafter(cls: D) -> D:
    """Class decorator: make a drafter available by its `name`."""
    if cls.name in _REGISTRY:
        raise ValueError(f"drafter {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_drafters() -> list[str]:
    return sorted(_REGISTRY)


def _drafter_class(name: str) -> type[Drafter]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown drafter {name!r}; choose from {available_drafters()}")
    return _REGISTRY[name]


def create_drafter(name: str, **kwargs: object) -> Drafter:
    """Instantiate a registered drafter; unknown names are a ValueError listing the choices."""
    factory: Callable[..., Drafter] = _drafter_class(name)
    return factory(**kwargs)


def drafter_for_target(name: str, model: torch.nn.Module, path: str | None = None) -> Drafter:
    """The registered drafter `name` for an engine serving `model` (`Drafter.for_target`)."""
    return _drafter_class(name).for_target(model, path)
