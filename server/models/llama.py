"""The Llama-family causal LM (Llama, Mistral, Qwen2, Qwen3, Phi-3, Phi-4-mini, Gemma 2,
Gemma 3, Granite, SmolLM2, SmolLM3, OLMo 2, and with mixture-of-experts MLPs Mixtral,
Qwen2-MoE, Qwen3-MoE, Granite MoE and OLMoE: `server.models.moe`) over a paged KV cache.

One forward serves a flat batch of every scheduled token of every request (prefill chunks,
decode tokens, draft tokens to verify): `forward(input_ids, positions, meta) -> hidden`,
then `compute_logits(hidden[rows])`. q/k/v and gate/up projections are fused so each layer
is a handful of ops. On CUDA the pointwise steps run as fused Triton kernels (residual add +
norm, SwiGLU: `kernels.triton_fused`; RoPE + KV-cache write: `kernels.triton_rope`); steps
of up to 6 tokens run the norms and the SwiGLU inside the dense GEMVs of the next
projection (`Linear.after_norm`, `after_silu`), and at batch 1 packed GEMVs hand their
unrounded sums to those kernels, which finish their split-K merge (`Linear.project`), and
the norms before them leave the norm's scale to the kernel after the GEMV
(`Linear.after_norm`); elsewhere they are torch ops, or on the CPU the native kernels
(`kernels.cpu_native`), and a step whose every query is short runs all its layers in one
native call (`kernels.cpu_layers`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice

import torch

from kernels import cpu_layers, cpu_native
from kernels.attention import soft_cap
from kernels.gemm import takes_every_row_count
from server.models.batch import BatchMeta, attention
from server.models.config import ModelConfig
from server.models.layers import (
    Activations,
    Embedding,
    Linear,
    add_rms_norm,
    dense_linear,
    gelu_mul,
    head_rms_norm,
    silu_mul,
)
from server.models.lora import LoraAdapter
from server.models.moe import SparseMoE
from server.models.registry import register_model
from server.models.rope import RopeInputs, RotaryEmbedding, apply_rope
from server.models.weights import load_weights, merge_lora, packed_weight_names


class DecoderLayer(torch.nn.Module):
    """Pre-norm attention + SwiGLU MLP (or, with `moe`, a mixture of SwiGLU experts)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, moe: bool = False) -> None:
        super().__init__()
        c = config
        qkv_out = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype)

        self.qkv_proj = Linear(empty(qkv_out, c.hidden_size), empty(qkv_out) if c.attention_bias else None)
        self.o_proj = Linear(empty(c.hidden_size, c.num_heads * c.head_dim))
        self.moe = SparseMoE(c, dtype) if moe else None
        self.gate_up_proj = None if moe else Linear(empty(2 * c.intermediate_size, c.hidden_size))
        self.down_proj = None if moe else Linear(empty(c.hidden_size, c.intermediate_size))
        # (OLMo 2's layer has neither: `ModelConfig.post_norms_only`)
        self.input_norm, self.post_norm = (
            (None, None) if c.post_norms_only else
            (torch.nn.Parameter(empty(c.hidden_size), requires_grad=False) for _ in "ip"))
        # Qwen3, Gemma 3: q's head norm weight, then k's, normed per head before RoPE
        self.head_norm = (torch.nn.Parameter(empty(2 * c.head_dim), requires_grad=False)
                          if c.qk_norm else None)
        # OLMo 2, OLMoE: q's norm weight across its heads, then k's
        self.qk_full_norm = (torch.nn.Parameter(empty(qkv_out - c.num_kv_heads * c.head_dim),
                                                requires_grad=False)
                             if c.qk_norm_full else None)
        # Gemma 2, 3 (and OLMo 2): the attention's and the MLP's outputs normed before their
        # residual adds
        self.gemma = c.gemma
        self.attn_out_norm, self.mlp_out_norm = (
            (torch.nn.Parameter(empty(c.hidden_size), requires_grad=False) for _ in "am")
            if c.gemma or c.post_norms_only else (None, None))
        self.eps = c.rms_norm_eps
        self.heads, self.kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.scale = c.attention_scale or c.head_dim ** -0.5
        self.softcap = c.attn_softcap  # (Gemma 2's soft-capped scores)
        # attends to sinks + a window: reads `BatchMeta.sparse` when the cache is hybrid
        self.windowed = False
        self.nope = False  # applies no RoPE (SmolLM3's every fourth layer)

    def forward(
        self, x: Activations, residual: torch.Tensor | None, rope: RopeInputs,
        kv: tuple[torch.Tensor, torch.Tensor], meta: BatchMeta, fused: bool,
    ) -> tuple[Activations, torch.Tensor]:
        """x: [T, hidden] (the previous layer's output before its residual add); `fused` runs
        the Triton kernels for the pointwise steps."""
        t = x.shape[0]
        if self.windowed and meta.sparse is not None:
            meta = meta.sparse
        if self.qk_full_norm is None:  # [T, (heads + 2 * kv_heads) * head_dim]
            qkv, residual = self.qkv_proj.after_norm(x, residual, self.input_norm, self.eps,
                                                     fused)
        else:  # (OLMo 2, OLMoE: q and k normed across their heads before RoPE)
            if self.input_norm is None:  # (OLMo 2: no norm before the attention)
                h = residual = x if residual is None else x + residual
            else:
                h, residual = add_rms_norm(x, residual, self.input_norm, self.eps, fused)
            qkv = self._norm_qk(self.qkv_proj(h), fused)
        head_norm = None if self.head_norm is None else (self.head_norm, self.eps)
        if fused:  # (norms q and k,) rotates them and writes k, v into the cache
            from kernels.triton_rope import rope_kv_write

            qkv = rope_kv_write(qkv, rope.positions, rope.cos, rope.sin, kv[0], kv[1],
                                meta.slot_mapping, self.heads, self.kv_heads, head_norm)
            q, k, v = qkv.view(t, -1, self.head_dim)[:, : self.heads], None, None
        else:
            qkv = qkv.view(t, -1, self.head_dim)
            # float32 on the CPU: one native call (norms,) rotates q, k and writes k, v into
            # the cache
            q = None if qkv.is_cuda else cpu_native.rope_kv_write(
                qkv, rope.cos, rope.sin, kv[0], kv[1], meta.slot_mapping, self.heads,
                self.kv_heads, head_norm=head_norm)
            if q is not None:
                k, v = None, None
            else:
                qk = qkv[:, : self.heads + self.kv_heads]
                if head_norm is not None:
                    qk = head_rms_norm(qk, *head_norm, self.heads)
                qk = apply_rope(qk, rope.cos, rope.sin)
                q, k, v = (qk[:, : self.heads], qk[:, self.heads :],
                           qkv[:, self.heads + self.kv_heads :])
        o = attention(q, k, v, kv[0], kv[1], meta, self.scale, softcap=self.softcap)
        if self.moe is not None:
            h, residual = add_rms_norm(self.o_proj(o.reshape(t, -1)), residual, self.post_norm,
                                       self.eps, fused)
            return self.moe(h, fused), residual
        if self.input_norm is None:  # (OLMo 2: the outputs normed, the MLP's input not)
            o = add_rms_norm(self.o_proj(o.reshape(t, -1)), None, self.attn_out_norm,
                             self.eps, fused)[0]
            residual = o + residual
            down = self.down_proj(silu_mul(self.gate_up_proj(residual), fused))
            return add_rms_norm(down, None, self.mlp_out_norm, self.eps, fused)[0], residual
        if self.gemma:  # (plain tensors between the products: no sums handed on)
            o = add_rms_norm(self.o_proj(o.reshape(t, -1)), None, self.attn_out_norm,
                             self.eps, fused)[0]
            gate_up, residual = add_rms_norm(o, residual, self.post_norm, self.eps, fused)
            down = self.down_proj(gelu_mul(self.gate_up_proj(gate_up)))
            return add_rms_norm(down, None, self.mlp_out_norm, self.eps, fused)[0], residual
        gate_up, residual = self.gate_up_proj.after_norm(
            self.o_proj.project(o.reshape(t, -1), fused), residual, self.post_norm, self.eps,
            fused)
        return self.down_proj.after_silu(gate_up, fused), residual

    def _norm_qk(self, qkv: torch.Tensor, fused: bool) -> torch.Tensor:
        """qkv with q's heads RMS-normed together by the first part of `qk_full_norm`, k's
        by the rest."""
        nq = self.heads * self.head_dim
        nk = self.qk_full_norm.shape[0] - nq
        q, k = (add_rms_norm(part.contiguous(), None, weight, self.eps, fused)[0]
                for part, weight in ((qkv[:, :nq], self.qk_full_norm[:nq]),
                                     (qkv[:, nq:nq + nk], self.qk_full_norm[nq:])))
        return torch.cat((q, k, qkv[:, nq + nk:]), dim=1)

    def native_weights(self) -> cpu_layers.LayerWeights:
        """The layer as `kernels.cpu_layers` runs it."""
        return cpu_layers.LayerWeights(
            *((p.packed, p.bias) for p in (self.qkv_proj, self.o_proj, self.gate_up_proj,
                                           self.down_proj)),
            self.input_norm, self.post_norm, self.windowed, self.head_norm,
            self.attn_out_norm, self.mlp_out_norm, self.gemma, self.nope)


# Rows from which a packed tied LM head gives way to the dense embedding, unless the native
# CPU kernel takes it (faster than the dense float32 head at every row count: 22 ms against
# 26 at 128 rows, 0.8 against 3.0 at one): through torch's kernels on 2 CPU cores the
# default model's Q8_0 head (49152x576) takes 2.2 ms at 1 row against 12.4 dense float32,
# 15 ms at 16 rows against 26, 28 at 32 against 32 (batch-32 decode: the same throughput
# either way), and at 64 rows, where the CPU path would dequantize the whole head for the
# dense GEMM (`kernels.gemm._CPU_DENSE_ROWS`), 154 against 51.
TIED_DENSE_ROWS = 64


@register_model("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "granite",
                "smollm3", "mixtral", "qwen2_moe", "qwen3_moe", "granitemoe", "olmo2", "olmoe")
class LlamaForCausalLM(torch.nn.Module):
    """Embedding, decoder layers, final norm and LM head (tied or not)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.embed = Embedding(torch.empty(config.vocab_size, config.hidden_size, dtype=dtype))
        self.layers = torch.nn.ModuleList(DecoderLayer(config, dtype, config.moe_layer(i))
                                          for i in range(config.num_layers))
        for i in config.nope_layers:
            self.layers[i].nope = True
        self.norm = torch.nn.Parameter(torch.empty(config.hidden_size, dtype=dtype), requires_grad=False)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            torch.empty(config.vocab_size, config.hidden_size, dtype=dtype)
        )
        self.rope = RotaryEmbedding(config, max_positions)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        # pointwise steps as Triton kernels: None = on CUDA tensors only; tests force True on
        # CPU (under TRITON_INTERPRET=1)
        self.fused_kernels: bool | None = None
        # the layers for one native call on the CPU, and the caches (list, length) they were
        # built with
        self._native: tuple[list, int, cpu_layers.DecoderStack | None] | None = None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: BatchMeta,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, hidden].

        `num_layers` runs only the first layers (early exit); their KV is written as usual.
        """
        x = self.embed(input_ids)
        if self.config.gemma:  # (scaled in the weights' dtype, as transformers does)
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        elif self.config.embedding_multiplier != 1.0:  # (Granite's)
            x = x * self.config.embedding_multiplier
        fused = x.is_cuda if self.fused_kernels is None else self.fused_kernels
        rope = self.rope.inputs(positions, x.dtype, fused)
        local = self.rope.inputs(positions, x.dtype, fused, "local") \
            if self.rope.has_local else rope
        identity = self.rope.inputs(positions, x.dtype, fused, "identity") \
            if self.rope.has_identity else None
        # (a ModuleList slice builds a new ModuleList: ~180 us a step on the CPU)
        count = len(self.layers) if num_layers is None else min(num_layers, len(self.layers))
        native = None if fused else self._native_forward(x, rope, local, meta, count, identity)
        if native is not None:
            x, residual = native
        else:
            residual = None
            for layer, kv in zip(islice(self.layers, count), self.kv_caches[:count], strict=True):
                turn = identity if layer.nope else local if layer.windowed else rope
                x, residual = layer(x, residual, turn, kv, meta, fused)
        return add_rms_norm(x, residual, self.norm, self.config.rms_norm_eps, fused)[0]

    def _native_forward(self, x: torch.Tensor, rope: RopeInputs, local: RopeInputs,
                        meta: BatchMeta, count: int, identity: RopeInputs | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first `count` layers in one native call (`kernels.cpu_layers`), where every
        query of the step is short and the native kernels take every weight (no layer has
        experts or OLMo's norms of q and k across heads); else None.
        (`local`: the window layers' RoPE, where they have their own; `identity`: the
        tables of layers that apply none, where some do.)"""
        t = x.shape[0]
        full = meta.native_step(t)
        sparse = None if meta.sparse is None else meta.sparse.native_step(t)
        if (full is None or meta.sparse is not None and sparse is None or not x.is_cpu
                or x.dtype != torch.float32 or cpu_native.library_in_use() is None
                or self.config.num_experts or self.config.qk_norm_full):
            return None
        built = self._native
        if built is None or built[0] is not self.kv_caches or built[1] != len(self.kv_caches):
            c, first = self.config, self.layers[0]
            shapes = cpu_layers.Shapes(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                       c.intermediate_size, first.eps, first.scale,
                                       c.rope_dim, c.attn_softcap or 0.0)
            self._native = (self.kv_caches, len(self.kv_caches), cpu_layers.decoder_stack(
                shapes, [layer.native_weights() for layer in self.layers], self.kv_caches))
        stack = self._native[2]
        if stack is None:
            return None
        return stack.run(x, rope.cos, rope.sin, (full, meta.slot_mapping),
                         None if sparse is None else (sparse, meta.sparse.slot_mapping), count,
                         None if local is rope else (local.cos, local.sin),
                         None if identity is None else (identity.cos, identity.sin))

    def kv_cache_bytes(self) -> int:
        """Bytes of `kv_caches`' tensors."""
        return sum(t.numel() * t.element_size() for kv in self.kv_caches for t in kv)

    def teacher_forced(self, ids: list[int], block_size: int = 16,
                       windows: Sequence[dict[str, int | None]] = ({},),
                       num_layers: int | None = None) -> torch.Tensor:
        """Final hidden states [len(ids), hidden] of one forward over `ids` with fresh
        contiguous caches (the model's own are set aside; of their element type, if it has
        any), e.g. to score a text or to train a drafter; `num_layers` as `forward`'s.
        `windows`: `BatchMeta` window settings, the first for every layer, a second for the
        layers marked `windowed`."""
        n, c, dev = len(ids), self.config, self.embed.device
        num_blocks = -(-n // block_size)
        saved = self.kv_caches
        kv_dtype = saved[0][0].dtype if saved else self.dtype
        self.kv_caches = [tuple(torch.zeros(num_blocks + 1, block_size, c.num_kv_heads,
                                            c.head_dim, dtype=kv_dtype, device=dev)
                                for _ in "kv") for _ in self.layers]
        positions = torch.arange(n, device=dev)
        args = (positions, torch.arange(num_blocks, dtype=torch.int32, device=dev)[None],
                torch.tensor([n], dtype=torch.int32, device=dev),
                torch.tensor([0, n], dtype=torch.int32, device=dev))
        metas = [BatchMeta(*args, **w) for w in windows]
        metas[0].sparse = metas[1] if len(metas) > 1 else None
        try:
            return self(torch.tensor(ids, device=dev), positions, metas[0], num_layers)
        finally:
            self.kv_caches = saved

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab]. A packed tied head (see
        `server.models.quantize`) serves fewer than TIED_DENSE_ROWS rows, or any number
        through the native CPU kernel; otherwise the dense embedding, which holds the same
        values. Granite's logits are divided by `ModelConfig.logits_scaling`, Gemma 2's
        soft-capped (`ModelConfig.final_softcap`)."""
        tied = self.config.tie_word_embeddings
        packed = self.lm_head.packed if self.lm_head is not None else None
        if packed is not None and not (tied and hidden.shape[0] >= TIED_DENSE_ROWS
                                       and not takes_every_row_count(packed)):
            logits = self.lm_head(hidden).float()
        else:
            head = self.embed.dense() if tied else self.lm_head.weight
            logits = dense_linear(hidden, head, out_dtype=torch.float32)
        if self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        return soft_cap(logits, self.config.final_softcap)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take HF-named tensors (`server.models.weights.load_weights`)."""
        load_weights(self, weights)

    def merge_lora(self, adapter: LoraAdapter) -> None:
        """Add a LoRA adapter's deltas to the dense weights (`server.models.weights`)."""
        merge_lora(self, adapter)

    def packed_weight_names(self) -> frozenset[str]:
        """HF names of the weights served packed already (`server.models.weights`)."""
        return packed_weight_names(self)
