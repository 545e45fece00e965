"""Training a draft head (`drafters.head`) on the target's own hidden states.

A corpus is token sequences, each with the position from which drafting is trained (for a
prompt answered by the target: the prompt's last token, whose hidden state drafts the
answer's second token). One teacher-forced forward of the target gives every position's
final hidden state h. A training example is a start t: the head steps from h_t with the
tokens x_{t+1}, x_{t+2}, ... (teacher forcing, as verification accepts them) for `unroll`
steps; step j is trained

- to predict the target's distribution at position t + j (the softmax of its LM head on
  h_{t+j}, over the draft vocabulary): soft cross-entropy, i.e. distillation, not the
  text's next token;
- to regress its feature onto h_{t+j} (smooth L1), so that the next step's input looks
  like what the target would give (EAGLE);

with weight `decay`**(j - 1). Training on the target's own greedy answers (self-distillation,
what `leapfrog train-drafter` does by default) makes the tokens it steps with the ones
verification accepts.

An early-exit adapter (`HeadConfig.exit_layer` L) is trained the same way, except that each
step's input is the target's own state after its first L layers at that position (from a
second forward, of L layers): drafting runs those layers on every draft, so there is no
feature of its own to carry from step to step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drafters.head import DraftHead, HeadConfig, target_head_rows


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of `train_head`."""

    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 256
    """Start positions per step."""
    lr: float = 2e-3
    """Peak learning rate (AdamW; linear warm-up over 5% of the steps, cosine decay)."""
    weight_decay: float = 0.0
    """AdamW's weight decay."""
    unroll: int = 4
    """Draft steps trained from each start position."""
    decay: float = 0.8
    """Weight of draft step j's loss: decay ** (j - 1)."""
    feature_weight: float = 1.0
    """Weight of the feature regression against the distillation loss."""
    draft_vocab_size: int = 8192
    """Tokens of the draft vocabulary: the most frequent in the corpus."""
    holdout: float = 0.05
    """Share of the sequences kept out of training to measure the head on."""
    seed: int = 0
    """Seed of the initial weights, the held-out split and the batches."""


@dataclass
class Corpus:
    """Teacher-forced positions of all sequences, concatenated."""

    hidden: torch.Tensor
    """[N, hidden]: the target's final hidden state at every position (on CPU)."""
    tokens: torch.Tensor
    """[N] long: the token at every position."""
    last: torch.Tensor
    """[N] long: the index of the last position of each position's sequence."""
    starts: list[torch.Tensor]
    """Per sequence, the positions drafting is trained from (each has a next token)."""
    inputs: torch.Tensor | None = None
    """[N, hidden]: for an early-exit adapter, the hidden state after the target's first
    layers at every position (final-normed, as the drafter sees it); None for a head."""

    @property
    def num_positions(self) -> int:
        return sum(len(s) for s in self.starts)


@torch.inference_mode()
def build_corpus(model: torch.nn.Module, sequences: Sequence[tuple[list[int], int]],
                 log: Callable[[str], None] = print, exit_layer: int | None = None) -> Corpus:
    """Run the target over each (token ids, first trained position) and gather its hidden
    states (and with `exit_layer`, those after its first exit_layer layers); sequences
    shorter than 2 tokens are skipped."""
    hidden, tokens, last, starts, inputs = [], [], [], [], []
    offset, begun = 0, time.perf_counter()
    for i, (ids, first) in enumerate(sequences):
        n = len(ids)
        if n < 2:
            continue
        hidden.append(model.teacher_forced(ids).float().cpu())
        if exit_layer is not None:
            inputs.append(model.teacher_forced(ids, num_layers=exit_layer).float().cpu())
        tokens.append(torch.tensor(ids))
        last.append(torch.full((n,), offset + n - 1))
        starts.append(torch.arange(offset + max(first, 0), offset + n - 1))
        offset += n
        if (i + 1) % 50 == 0:
            log(f"  hidden states: {i + 1}/{len(sequences)} sequences, {offset} tokens, "
                f"{time.perf_counter() - begun:.0f} s")
    if not hidden:
        raise ValueError("no sequence of at least 2 tokens to train on")
    return Corpus(torch.cat(hidden), torch.cat(tokens), torch.cat(last), starts,
                  torch.cat(inputs) if inputs else None)


def draft_vocabulary(tokens: torch.Tensor, starts: list[torch.Tensor], size: int,
                     vocab_size: int) -> torch.Tensor:
    """The `size` token ids that occur most often after the start positions `starts` of
    `tokens` (a corpus's trained stretches; ties: lower id first), sorted by id."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in starts:
        counts += torch.bincount(tokens[s + 1], minlength=vocab_size)
    order = torch.argsort(-counts, stable=True)[: min(size, vocab_size)]
    return order.sort().values


def _unrolled(corpus: Corpus, starts: torch.Tensor, unroll: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each start, the `unroll` positions after it clamped to its sequence [n, unroll],
    which of them are inside it, and the tokens there."""
    last = corpus.last[starts][:, None]
    pos = starts[:, None] + torch.arange(1, unroll + 1)
    valid = pos <= last
    pos = torch.minimum(pos, last)
    return pos, valid, corpus.tokens[pos]


def _losses(head: DraftHead, embed: torch.Tensor, corpus: Corpus, starts: torch.Tensor,
            cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The weighted loss of one batch of start positions."""
    pos, valid, tokens = _unrolled(corpus, starts, cfg.unroll)
    feature = corpus.hidden[starts].to(device, dtype)
    total = torch.zeros((), device=device)
    for j in range(cfg.unroll):
        target = corpus.hidden[pos[:, j]].to(device, dtype)
        feature = _step(head, corpus, feature, tokens[:, j], pos[:, j], embed, dtype)
        with torch.no_grad():
            teacher = head.logits(target).softmax(-1)
        mask = valid[:, j].to(device)
        ce = -(teacher * head.logits(feature).log_softmax(-1)).sum(-1)
        reg = F.smooth_l1_loss(feature.float(), target.float(), reduction="none").mean(-1)
        per = (ce + cfg.feature_weight * reg) * mask
        # (an adapter's steps each start from the target's own shallow state: no decay)
        weight = 1.0 if corpus.inputs is not None else cfg.decay ** j
        total = total + weight * per.sum() / mask.sum().clamp(min=1)
    return total


def _step(head: DraftHead, corpus: Corpus, feature: torch.Tensor, token: torch.Tensor,
          pos: torch.Tensor, embed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One draft step: a head's from its previous feature and the token after it, an
    adapter's from the token's shallow state at `pos`."""
    if corpus.inputs is not None:
        return head.step(corpus.inputs[pos].to(embed.device, dtype))
    return head.step(feature, F.embedding(token.to(embed.device), embed))


@torch.no_grad()
def evaluate(head: DraftHead, model: torch.nn.Module, corpus: Corpus, starts: torch.Tensor,
             k: int, limit: int = 4096) -> dict[str, float]:
    """Offline acceptance of greedy k-token drafts from up to `limit` start positions:
    draft j is accepted while every draft before it was, it equals the target's argmax
    (full vocabulary) at that position, and the text there is that argmax too (so the
    position's hidden state is the one verification would see). Also the share of the
    target's argmax tokens inside the draft vocabulary."""
    starts = starts[:limit]
    device, dtype = model.embed.device, model.dtype
    embed = model.embed.dense()
    c = corpus
    pos, valid, tokens = _unrolled(corpus, starts, k)
    targets = torch.stack([model.compute_logits(c.hidden[pos[:, j]].to(device, dtype))
                           .argmax(-1).cpu() for j in range(k)], 1)  # [n, k]
    # the text follows the target at position t + j + 1 (next token after pos j)
    nxt = torch.where(pos + 1 <= c.last[starts][:, None], c.tokens[(pos + 1).clamp(max=len(c.tokens) - 1)], -1)
    follows = nxt == targets
    feature = c.hidden[starts].to(device, dtype)
    token = tokens[:, 0]
    alive = torch.ones(len(starts), dtype=torch.bool)
    accepted = torch.zeros(len(starts))
    for j in range(k):
        feature = _step(head, corpus, feature, token, pos[:, j], embed, dtype)
        draft = head.vocab[head.logits(feature).argmax(-1)].cpu()
        alive &= valid[:, j] & (draft == targets[:, j])
        accepted += alive.float()
        alive &= follows[:, j]
        token = draft
    covered = torch.isin(targets[:, 0], head.vocab.cpu()).float().mean()
    return {"mean_accepted_length": 1 + accepted.mean().item(), "vocab_coverage": covered.item(),
            "first_draft_accuracy": (accepted >= 1).float().mean().item(),
            "positions": len(starts)}


def train_head(model: torch.nn.Module, corpus: Corpus, head_config: HeadConfig,
               cfg: TrainConfig, log: Callable[[str], None] = print) -> tuple[DraftHead, dict]:
    """Train a draft head for `model` on `corpus`; returns it (frozen, in the model's dtype)
    and a report (loss curve points, held-out acceptance)."""
    if (head_config.exit_layer is not None) != (corpus.inputs is not None):
        raise ValueError("an early-exit adapter trains on a corpus built with its exit_layer, "
                         "a head on one built without")
    torch.manual_seed(cfg.seed)
    device = model.embed.device
    # the head trains in float32 whatever the model's dtype; it serves in the model's
    dtype = torch.float32
    order = torch.randperm(len(corpus.starts), generator=torch.Generator().manual_seed(cfg.seed))
    n_held = int(len(order) * cfg.holdout) if len(order) > 1 else 0
    held = [corpus.starts[i] for i in order[:n_held].tolist()]
    train = [corpus.starts[i] for i in order[n_held:].tolist()]
    train_starts = torch.cat(train)
    if len(train_starts) == 0:
        raise ValueError("no training positions")
    vocab = draft_vocabulary(corpus.tokens, train, cfg.draft_vocab_size, head_config.vocab_size)
    lm_rows = target_head_rows(model, vocab).to(device, dtype)
    head = DraftHead(head_config, vocab.to(device), lm_rows).to(device)
    with torch.no_grad():  # start the output norm at the target's final norm
        head.norms[3].copy_(model.norm.float())
    embed = model.embed.dense().to(dtype)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.steps // 20)

    def rate(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    rng = torch.Generator().manual_seed(cfg.seed)
    curve, running, begun = [], 0.0, time.perf_counter()
    every = max(1, cfg.steps // 20)
    for step in range(cfg.steps):
        starts = train_starts[torch.randint(len(train_starts), (cfg.batch_size,), generator=rng)]
        loss = _losses(head, embed, corpus, starts, cfg, device, dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            n = (step % every) + 1
            curve.append({"step": step + 1, "loss": running / n})
            log(f"  step {step + 1}/{cfg.steps}: loss {running / n:.4f} "
                f"({time.perf_counter() - begun:.0f} s)")
            running = 0.0
    head = head.to(model.dtype).requires_grad_(False).eval()
    report = {"curve": curve, "train_positions": len(train_starts),
              "train_seconds": time.perf_counter() - begun}
    if held:
        report["held_out"] = evaluate(head, model, corpus, torch.cat(held), cfg.unroll)
    return head, report
