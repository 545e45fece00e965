"""A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, Granite MoE, OLMoE): a router
picks each token's top k SwiGLU experts, whose outputs are summed weighted by their routing
probabilities (and Qwen2-MoE adds a shared expert every token goes through, scaled by a
sigmoid gate).

Tokens are grouped by expert, so each expert runs one product over the rows routed to it:
its `Linear`s are dense or packed as any projection (`server.models.quantize` packs them),
and a row's result does not depend on which other rows share the step (its k experts' sums
are added in expert order, and on the CPU the router's and the shared gate's dense products
are taken a row at a time: `_row_products`). Grouping reads the counts on the host, so a
step with experts cannot be captured in a CUDA graph: such models run eagerly on CUDA.
"""

from __future__ import annotations

import torch

from server.models.config import ModelConfig
from server.models.layers import Linear, dense_linear, silu_mul


class Expert(torch.nn.Module):
    """One SwiGLU MLP: gate and up fused, then down."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = Linear(torch.empty(2 * intermediate, hidden, dtype=dtype))
        self.down_proj = Linear(torch.empty(hidden, intermediate, dtype=dtype))

    def forward(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x), fused))


class SparseMoE(torch.nn.Module):
    """The routed experts of one layer (and its shared expert, where the model has one)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        c = config
        self.router = torch.nn.Parameter(torch.empty(c.num_experts, c.hidden_size, dtype=dtype),
                                         requires_grad=False)
        self.experts = torch.nn.ModuleList(
            Expert(c.hidden_size, c.expert_intermediate_size, dtype)
            for _ in range(c.num_experts))
        self.top_k = c.experts_per_token
        self.normalize = c.normalize_expert_weights
        shared = c.shared_expert_intermediate_size
        self.shared = Expert(c.hidden_size, shared, dtype) if shared else None
        self.shared_gate = torch.nn.Parameter(torch.empty(1, c.hidden_size, dtype=dtype),
                                              requires_grad=False) if shared else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> (weights [T, k] in x's dtype, expert ids [T, k]): the softmax
        over the router's float32 logits, its top k, renormalized where the model does."""
        probs = torch.softmax(_row_products(x, self.router).float(), dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        """x: [T, hidden] (normed) -> [T, hidden]. The (token, slot) pairs sorted by expert:
        one gather of their rows and weights, each expert a slice of them, and one scatter
        of the weighted outputs, which adds each token's k in expert order."""
        weights, ids = self.route(x)
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        tokens = order // self.top_k
        rows = x[tokens]
        outs, start = [], 0
        for expert, count in zip(self.experts, counts, strict=True):
            if count:
                outs.append(expert(rows[start:start + count], fused))
                start += count
        y = torch.cat(outs) * weights.reshape(-1)[order, None]
        out = torch.zeros_like(x).index_add_(0, tokens, y)
        if self.shared is not None:
            gate = torch.sigmoid(_row_products(x, self.shared_gate))
            out = out + gate * self.shared(x, fused)
        return out

    def linears(self) -> list[tuple[str, Linear]]:
        """(name relative to the layer, Linear) of every expert's projections."""
        named = [(f"moe.experts.{e}.{p}", getattr(expert, p))
                 for e, expert in enumerate(self.experts) for p in ("gate_up_proj", "down_proj")]
        if self.shared is not None:
            named += [(f"moe.shared.{p}", getattr(self.shared, p))
                      for p in ("gate_up_proj", "down_proj")]
        return named


def _row_products(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ weight [out, in]^T. On the CPU as T products of one row (one batched
    call), whose sums do not depend on T: torch's GEMM rounds a row differently with the
    number of rows beside it (up to 1e-4 on a 128-expert router of width 2,048, one row
    against 40), which would let a request's routing weights change with the batch. (4.7 ms
    for 512 rows of that router against 1.5 as one product: small beside its experts.)"""
    if not x.is_cpu:
        return dense_linear(x, weight)
    return torch.bmm(x[:, None, :], weight.T.expand(x.shape[0], *weight.T.shape))[:, 0]
