"""The scheduler's speculation step plan: after it has chosen a step's tokens, how many drafts
each request verifies in this step (a padded step's, trimmed to what pays) and may ask for
in its next one, and their KV slots when the drafter writes its drafts' KV.

Pure Python on the step's `ScheduledRequest`s, like the scheduler that calls it."""

from __future__ import annotations

from server.engine.block_manager import BlockManager
from server.engine.contracts import ScheduledRequest
from server.engine.spec_policy import SpecPolicy


def plan_drafts(scheduled: list[ScheduledRequest], policy: SpecPolicy, blocks: BlockManager,
                budget: int, max_model_len: int, draft_slots: bool, trim: bool) -> None:
    """Trim a padded step's drafts to what pays (`trim`: not those of a step whose drafts
    only the device has), size each request's drafts after this step within the step's
    token `budget`, and reserve their KV slots (`draft_slots`)."""
    # a step of decoding requests only (no prompt chunk) is one the CUDA graphs (when
    # present) replay padded, and the next one will likely be one too
    padded = decoding(scheduled) and policy.pads(len(scheduled))
    if padded and trim:
        _trim_padded_drafts(scheduled, policy, blocks)
    _assign_draft_lengths(scheduled, policy, budget, max_model_len, padded)
    if draft_slots:
        _reserve_draft_slots(scheduled, blocks)


def decoding(scheduled: list[ScheduledRequest]) -> bool:
    """A step of decoding requests only (no prompt chunk): what CUDA graphs replay."""
    return all(s.reaches_end and s.num_new_tokens == 1 + len(s.spec_token_ids) for s in scheduled)


def _assign_draft_lengths(scheduled: list[ScheduledRequest], policy: SpecPolicy, budget: int,
                          max_model_len: int, padded: bool) -> None:
    """How many drafts each request may get for its next step: one Q for all of a `padded`
    step (see `SpecPolicy`), else request by request."""
    step_tokens = sum(s.num_new_tokens - len(s.spec_token_ids) for s in scheduled)
    spare = budget - step_tokens
    producing = [s for s in scheduled if s.reaches_end]
    bound = policy.disable_by_batch_size
    if bound is not None and len(scheduled) >= bound:
        for s in producing:
            s.num_draft_tokens_next = 0
        return
    limits = [max(0, min(_draft_room(s, max_model_len), spare)) for s in producing]
    if padded:
        ids = [s.request.request_id for s in producing]
        lengths = policy.padded_draft_lengths(list(zip(ids, limits, strict=True)), spare,
                                              explore=True)
        for s, k in zip(producing, lengths, strict=True):
            s.num_draft_tokens_next = k
        return
    for s, limit in zip(producing, limits, strict=True):
        limit = min(limit, spare)
        k = (policy.draft_length(s.request.request_id, step_tokens, len(producing), limit)
             if limit else 0)
        spare -= k
        step_tokens += k
        s.num_draft_tokens_next = k


def _reserve_draft_slots(scheduled: list[ScheduledRequest], blocks: BlockManager) -> None:
    """Allocate the KV slots of each request's next drafts: after this step its newest token
    is at most at position computed + this step's tokens, and its k drafts write from there.
    Drafts the cache has no room for are not asked for (no preemption)."""
    for s in scheduled:
        k = s.num_draft_tokens_next
        if not k:
            continue
        r = s.request
        end = r.num_computed_tokens + s.ahead + s.num_new_tokens
        while k and not blocks.can_allocate(r.request_id, end + k):
            k -= 1
        if k:
            blocks.allocate(r.request_id, end + k)
        s.num_draft_tokens_next = k


def _trim_padded_drafts(scheduled: list[ScheduledRequest], policy: SpecPolicy,
                        blocks: BlockManager) -> None:
    """A padded step verifies as many tokens a request as its longest draft asks: now that
    the drafts are known, keep only as many as pay for that padding (the policy's rule
    again, each request limited to the drafts it has)."""
    drafts = [len(s.spec_token_ids) for s in scheduled]
    if not any(drafts):
        return
    keep = policy.padded_draft_lengths(
        [(s.request.request_id, n) for s, n in zip(scheduled, drafts, strict=True)], sum(drafts))
    for s, n, k in zip(scheduled, drafts, keep, strict=True):
        if k < n:
            r = s.request
            s.spec_token_ids, r.spec_token_ids = s.spec_token_ids[:k], r.spec_token_ids[:k]
            if r.draft_probs is not None:
                r.draft_probs = r.draft_probs[:k]
            s.num_new_tokens -= n - k
            blocks.truncate(r.request_id, r.num_computed_tokens + s.num_new_tokens)


def _draft_room(s: ScheduledRequest, max_model_len: int) -> int:
    """Most drafts a request's next step may verify (its max_tokens and max_model_len)."""
    r = s.request
    return min(r.params.max_tokens - len(r.output_token_ids) - 1,
               max_model_len - r.num_tokens - 1) - len(s.spec_token_ids) - s.ahead
