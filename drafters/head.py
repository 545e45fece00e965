"""Trained drafters: a draft head fed by the target's hidden states (EAGLE / Hydra style),
and self-speculation through the target's first layers plus an adapter (Kangaroo); both
exit early on their own confidence (Kangaroo's second exit). `ngram-head` asks prompt
lookup first and the head where it finds nothing.

One step of the head maps (feature f, token x) to the next feature: f is the target's
final hidden state at the token before x (for the first draft) or the head's own previous
output (for the drafts after it), x the token that follows it:

    z  = W_in [norm_a(f); norm_b(embed[x])]
    z  = z + down(silu(gate(norm_c(z))) * up(norm_c(z)))
    f' = norm_d(z)                                      (regressed onto the target's next hidden)
    logits = f' @ E^T                                   (E: the target's LM-head rows of the draft vocabulary)

The self-speculation adapter (`HeadConfig.exit_layer` = L) is the same block fed only
norm_a(s), s the token's hidden state after the target's first L layers (final-normed), and
regressed onto the target's final hidden state at that token: each draft runs through those
L layers (their KV cache is the target's, so the whole context is seen) and the adapter.

The draft vocabulary is the `draft_vocab_size` tokens the target emitted most in training
(a reduced head, as in FR-Spec / EAGLE-3): on the default model the full head is a fifth of
a forward, which drafting k tokens would pay k times. Drafting is greedy (argmax; verified
as one-hot q, which keeps sampled requests exact) and stops early, after the first draft,
at a token whose probability under the head is below `threshold`.

The head owns no per-request state and no KV cache: all its context comes through the
target's hidden state. Its weights (`save`/`load`: one safetensors file) are trained by
`leapfrog train-drafter` (`drafters.train`); the LM-head rows and the embedding are the
target's own, taken at load.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from drafters.base import DraftBatch, Drafter, Proposal, register_drafter
from server.models.layers import Embedding

FORMAT = "leapfrog-draft-head-1"
"""The `format` entry of a saved head's metadata."""


@dataclass(frozen=True)
class HeadConfig:
    """The shape of a draft head and the target it was trained for."""

    hidden_size: int
    """The target's hidden size."""
    intermediate_size: int
    """Width of the head's SwiGLU block."""
    vocab_size: int
    """The target's vocabulary size."""
    num_layers: int
    """The target's layer count (with hidden and vocab sizes: the check that a saved head
    is loaded for the model it was trained on)."""
    rms_norm_eps: float = 1e-6
    """The target's RMS-norm epsilon, used by the head's norms."""
    threshold: float = 0.2
    """Drafting stops before a draft (after the first) whose head probability is below it."""
    exit_layer: int | None = None
    """None: a draft head on the target's final hidden state and the next token (drafter
    `head`). A layer count L: the adapter of self-speculation (drafter `early-exit`), fed the
    hidden state after the target's first L layers at the token itself."""


class DraftHead(torch.nn.Module):
    """The head's weights and its step; `vocab` [V] holds the draft vocabulary's token ids
    and `lm_rows` [V, hidden] the target's LM-head rows for them (frozen)."""

    def __init__(self, config: HeadConfig, vocab: torch.Tensor, lm_rows: torch.Tensor) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.config = config
        self.fc = torch.nn.Linear((1 if config.exit_layer else 2) * h, h, bias=False)
        self.gate_up = torch.nn.Linear(h, 2 * i, bias=False)
        self.down = torch.nn.Linear(i, h, bias=False)
        self.norms = torch.nn.Parameter(torch.ones(4, h))
        self.register_buffer("vocab", vocab.to(torch.long), persistent=False)
        self.register_buffer("lm_rows", lm_rows, persistent=False)

    def _norm(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.norms[i], self.config.rms_norm_eps)

    def step(self, feature: torch.Tensor, token_embedding: torch.Tensor | None = None
             ) -> torch.Tensor:
        """[N, hidden] feature and embedding of the token after it -> the next feature (an
        adapter, `exit_layer` set, takes the feature alone: its token's shallow state)."""
        z = self._norm(feature, 0)
        if token_embedding is not None:
            z = torch.cat([z, self._norm(token_embedding, 1)], -1)
        z = self.fc(z)
        gate, up = self.gate_up(self._norm(z, 2)).chunk(2, -1)
        return self._norm(z + self.down(F.silu(gate) * up), 3)

    def logits(self, feature: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits over the draft vocabulary [N, V]."""
        return F.linear(feature, self.lm_rows).float()

    def save(self, path: str | Path, **metadata: str) -> None:
        """One safetensors file: the weights, the draft vocabulary, and the config as JSON
        metadata (plus any string `metadata`, e.g. what it was trained on)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tensors["vocab"] = self.vocab.cpu()
        save_file(tensors, str(path), metadata={
            "format": FORMAT, "config": json.dumps(asdict(self.config)), **metadata})


def target_head_rows(model: torch.nn.Module, vocab: torch.Tensor) -> torch.Tensor:
    """The target's LM-head rows [len(vocab), hidden] for `vocab`, dense in the model's
    dtype (a packed head is dequantized row by row: the values it serves)."""
    head = model.lm_head
    if head is None:  # tied: the embedding is the head
        return model.embed(vocab.to(model.embed.device))
    if head.packed is not None:
        from kernels.quant import dequantize
        from server.models.quantize import permute_rows

        rows = permute_rows(head.packed, vocab.to(head.packed.qweight.device))
        return dequantize(rows, model.dtype)
    return head.weight[vocab.to(head.weight.device)]


def config_for(model: torch.nn.Module, intermediate_size: int | None = None,
               threshold: float = HeadConfig.threshold, exit_layer: int | None = None
               ) -> HeadConfig:
    """A head config (or with `exit_layer`, an adapter's) for a target model
    (`server.models.llama.LlamaForCausalLM`); an exit layer outside 1 to num_layers - 1 is a
    ValueError."""
    c = model.config
    if exit_layer is not None and not 0 < exit_layer < c.num_layers:
        raise ValueError(f"exit_layer must be 1 to {c.num_layers - 1} (the model has "
                         f"{c.num_layers} layers), got {exit_layer}")
    return HeadConfig(c.hidden_size, intermediate_size or c.intermediate_size // 2,
                      c.vocab_size, c.num_layers, c.rms_norm_eps, threshold, exit_layer)


def load_head(path: str | Path, model: torch.nn.Module) -> DraftHead:
    """Load a saved head for `model` (on its device and dtype); a head trained for another
    model shape, or a file that is not a head, is a ValueError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"draft head file {str(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # safetensors raises its own error types for bad files
        raise ValueError(f"{path}: not a safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a Leapfrog draft head (format {meta.get('format')!r})")
    config = HeadConfig(**json.loads(meta["config"]))
    c = model.config
    want = (c.hidden_size, c.vocab_size, c.num_layers)
    have = (config.hidden_size, config.vocab_size, config.num_layers)
    if want != have:
        raise ValueError(f"{path}: the head was trained for a model of hidden size, vocabulary "
                         f"and layers {have}; this model has {want}")
    vocab = tensors.pop("vocab")
    device = model.embed.device
    head = DraftHead(config, vocab, target_head_rows(model, vocab))
    head.load_state_dict(tensors)
    return head.to(device=device, dtype=model.dtype).requires_grad_(False).eval()


@register_drafter
class HeadDrafter(Drafter):
    """Drafts with a trained `DraftHead` from the target's hidden state at each request's
    newest token's predecessor; greedy, deterministic proposals."""

    name = "head"
    needs_hidden_states = True

    def __init__(self, head: DraftHead, embed: Embedding) -> None:
        self.head = head
        self.embed = embed
        self.graphs: _DraftGraphs | None = None

    @classmethod
    def for_target(cls, model: torch.nn.Module, path: str | None) -> HeadDrafter:
        return cls(_trained(cls.name, model, path, adapter=False), model.embed)

    @torch.inference_mode()
    def capture_graphs(self, batch_sizes: Sequence[int], draft_lengths: Sequence[int]) -> None:
        self.graphs = _DraftGraphs(self._draft, self.head.config.hidden_size, self.embed,
                                   batch_sizes, draft_lengths)

    def device_drafts(self) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
        def drafts(feature: torch.Tensor, tokens: torch.Tensor, steps: int) -> torch.Tensor:
            return self._draft(feature.to(self.embed.dtype), tokens, steps, False)[0]

        return drafts

    def _draft(self, feature: torch.Tensor, tokens: torch.Tensor, steps: int,
               stop_when_unsure: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`steps` draft steps from features [N, hidden] and the tokens after them [N]: each
        row's drafts [N, steps] and the head's probability of each (fewer steps with
        `stop_when_unsure`, once every row has a draft after its first that the head is
        unsure of: one host sync a step)."""
        head = self.head
        drafts, probs = [], []
        going = None  # (stop_when_unsure) rows whose every draft so far is kept
        for i in range(steps):
            feature = head.step(feature, self.embed(tokens))
            best, index = head.logits(feature).softmax(-1).max(-1)
            tokens = head.vocab[index]
            drafts.append(tokens)
            probs.append(best)
            if stop_when_unsure and i:  # (the first draft is kept, sure or not)
                sure = best >= head.config.threshold
                going = sure if going is None else going & sure
                if not bool(going.any()):
                    break
        return torch.stack(drafts, 1), torch.stack(probs, 1)

    @torch.inference_mode()
    def propose(self, batch: DraftBatch) -> list[Proposal]:
        requests = batch.requests
        if batch.hidden_states is None:
            raise ValueError("the head drafter needs the target's hidden states")
        feature = batch.hidden_states.to(self.embed.dtype)
        tokens = torch.tensor([r.token_ids[-1] for r in requests])
        most = max(r.max_draft_tokens for r in requests)
        replay = self.graphs.run(feature, tokens, most) if self.graphs is not None else None
        drafts, probs = replay or self._draft(feature, tokens.to(self.embed.device), most, True)
        ids = drafts.tolist()  # [N, steps]
        sure = (probs >= self.head.config.threshold).tolist()
        proposals = []
        for r, row, ok in zip(requests, ids, sure, strict=True):
            n = 1  # the first draft always; then while the head is confident
            while n < min(len(row), r.max_draft_tokens) and ok[n]:
                n += 1
            proposals.append(Proposal(row[:n]))
        return proposals


class _DraftGraphs:
    """A head's draft loop as CUDA graphs, one per (requests bucket, draft steps). Eager, a
    draft step is ~30 kernel launches, which the H200 machine's host issued in ~500 us for
    ~50 us of device work (docs/benchmarks/gpu.md, run 148); a replay is one launch. The
    graphs run every step (no early stop: that needs a host sync a step); rows past a
    batch's own in its bucket compute on stale inputs, which no row reads."""

    def __init__(self, draft: Callable[..., tuple[torch.Tensor, torch.Tensor]], hidden_size: int,
                 embed: Embedding, batch_sizes: Sequence[int], draft_lengths: Sequence[int]
                 ) -> None:
        self.batch_sizes, self.draft_lengths = sorted(batch_sizes), sorted(draft_lengths)
        rows = self.batch_sizes[-1]
        self.feature = torch.zeros(rows, hidden_size, dtype=embed.dtype, device=embed.device)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=embed.device)
        side = torch.cuda.Stream()  # (the kernels' first calls, outside any capture)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            draft(self.feature, self.tokens, self.draft_lengths[-1], False)
        torch.cuda.current_stream().wait_stream(side)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]]
        self.graphs = {}
        pool = None
        for b in reversed(self.batch_sizes):  # largest first: the smaller reuse its pool
            for steps in reversed(self.draft_lengths):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = draft(self.feature[:b], self.tokens[:b], steps, False)
                graph.replay()  # (a graph's first replay uploads it: paid here)
                pool = graph.pool()
                self.graphs[b, steps] = graph, out

    def run(self, feature: torch.Tensor, tokens: torch.Tensor, steps: int
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The drafts and probabilities [N, >= steps] of features [N, hidden] and host tokens
        [N]; None when no graph is that large."""
        n = feature.shape[0]
        b = next((b for b in self.batch_sizes if b >= n), None)
        s = next((s for s in self.draft_lengths if s >= steps), None)
        if b is None or s is None:
            return None
        self.feature[:n].copy_(feature)
        self.tokens[:n].copy_(tokens)
        graph, (drafts, probs) = self.graphs[b, s]
        graph.replay()
        return drafts[:n], probs[:n]


def _trained(name: str, model: torch.nn.Module, path: str | None, adapter: bool) -> DraftHead:
    """The drafter `name`'s weights: an early-exit adapter (`adapter`) or a draft head; the
    other kind, or no file, is a ValueError that says what to do."""
    if path is None:
        raise ValueError(f"the {name} drafter needs trained weights: --speculative-model "
                         f"PATH (a file `leapfrog train-drafter` wrote)")
    head = load_head(path, model)
    if adapter and head.config.exit_layer is None:
        raise ValueError(f"{path}: a draft head, not an early-exit adapter; serve it with "
                         f"--speculative head, or train one with --exit-layer")
    if not adapter and head.config.exit_layer is not None:
        raise ValueError(f"{path}: an early-exit adapter (trained with --exit-layer); "
                         f"serve it with --speculative early-exit")
    return head


@register_drafter
class EarlyExitDrafter(Drafter):
    """Self-speculation (Kangaroo's double early exit): each draft runs through the target's
    own first `exit_layer` layers (their KV cache is the target's: the context is already
    there) and a small trained adapter with the target's LM-head rows; drafting stops early
    when the adapter is unsure (`HeadConfig.threshold`). Greedy, deterministic proposals."""

    name = "early-exit"

    def __init__(self, head: DraftHead) -> None:
        if head.config.exit_layer is None:
            raise ValueError("an early-exit drafter needs an adapter trained with --exit-layer")
        self.head = head
        self.num_draft_layers = head.config.exit_layer

    @classmethod
    def for_target(cls, model: torch.nn.Module, path: str | None) -> EarlyExitDrafter:
        return cls(_trained(cls.name, model, path, adapter=True))

    @torch.inference_mode()
    def propose(self, batch: DraftBatch) -> list[Proposal]:
        requests = batch.requests
        if batch.forward is None:
            raise ValueError("the early-exit drafter needs the target's shallow forward")
        head = self.head
        drafts: list[list[int]] = [[] for _ in requests]
        rows = list(range(len(requests)))
        tokens = torch.tensor([r.token_ids[-1] for r in requests], device=head.vocab.device)
        offset = 0
        while rows:
            feature = head.step(batch.forward(rows, tokens, offset))
            best, index = head.logits(feature).softmax(-1).max(-1)
            tokens = head.vocab[index]
            sure = (best >= head.config.threshold).tolist()
            going = []
            for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
                if offset and not sure[i]:
                    continue  # (the first draft always; then while the adapter is sure)
                drafts[row].append(token)
                if len(drafts[row]) < requests[row].max_draft_tokens:
                    going.append(i)
            if len(going) < len(rows):
                rows = [rows[i] for i in going]
                tokens = tokens[torch.tensor(going, dtype=torch.long, device=tokens.device)]
            offset += 1
        return [Proposal(d) for d in drafts]


@register_drafter
class NgramHeadDrafter(Drafter):
    """Prompt lookup first, the draft head where it finds nothing: n-gram matches are cheap
    and often long where the answer repeats its context (summaries, rewrites), the head
    drafts where it does not (arithmetic, new prose)."""

    name = "ngram-head"
    needs_hidden_states = True

    def __init__(self, head: HeadDrafter) -> None:
        from drafters.ngram import NgramDrafter

        self.ngram = NgramDrafter()
        self.head = head

    @classmethod
    def for_target(cls, model: torch.nn.Module, path: str | None) -> NgramHeadDrafter:
        return cls(HeadDrafter.for_target(model, path))

    def propose(self, batch: DraftBatch) -> list[Proposal]:
        proposals = self.ngram.propose(DraftBatch(batch.requests))
        empty = [i for i, p in enumerate(proposals) if not p.token_ids]
        if empty:
            index = torch.tensor(empty, device=batch.hidden_states.device)
            rest = DraftBatch([batch.requests[i] for i in empty], batch.hidden_states[index])
            for i, p in zip(empty, self.head.propose(rest), strict=True):
                proposals[i] = p
        return proposals

    def capture_graphs(self, batch_sizes: Sequence[int], draft_lengths: Sequence[int]) -> None:
        self.head.capture_graphs(batch_sizes, draft_lengths)

    def release(self, request_id: str) -> None:
        self.ngram.release(request_id)
