"""The fused pointwise kernels (interpreted on CPU) against their torch references, and the
model's fused path against its torch path.

Per element, |kernel - expected| <= RTOL[dtype] * |expected| + ATOL, for two expectations:
the `_reference` in the same dtype, and the reference run in float64 on the same inputs
(the exact result). RTOL is one ulp of the output dtype: rounding to nearest costs half an
ulp, and the interpreter converts float32 to bfloat16 by truncation (compiled Triton rounds
to nearest even), which costs up to one. The float32 math itself adds ~1e-7 relative.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

from server.models.batch import BatchMeta  # noqa: E402
from server.models.config import ModelConfig  # noqa: E402
from server.models.llama import LlamaForCausalLM  # noqa: E402

fused = pytest.importorskip("kernels.triton_fused")
rope = pytest.importorskip("kernels.triton_rope")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
ATOL = 1e-5


def _assert_close(out: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    assert out.shape == expected.shape
    err = (out.double() - expected.double()).abs()
    bound = rtol * expected.double().abs() + ATOL
    assert bool((err <= bound).all()), f"max abs error {err.max().item():.3g}"


def _randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,hidden", [(1, 576), (3, 64), (7, 576)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm(dtype: torch.dtype, t: int, hidden: int, with_residual: bool) -> None:
    x = _randn(t, hidden, dtype=dtype, seed=0, scale=3.0)
    residual = _randn(t, hidden, dtype=dtype, seed=1) if with_residual else None
    weight = _randn(hidden, dtype=dtype, seed=2, scale=0.2) + 1
    normed, residual_out = fused.add_rms_norm(x, residual, weight, 1e-5)
    _, ref_residual = fused.add_rms_norm_reference(x, residual, weight, 1e-5)
    if residual is None:
        assert residual_out is x
    elif dtype == torch.bfloat16:  # the interpreter's truncation, see the module docstring
        _assert_close(residual_out, ref_residual, RTOL[dtype])
    else:  # rounded to x.dtype exactly as torch's x + residual
        assert torch.equal(residual_out, ref_residual)
    # the norm of the kernel's own residual_out (for bfloat16 it may be an ulp off the reference's)
    for r, w in ((residual_out, weight), (residual_out.double(), weight.double())):
        _assert_close(normed, fused.add_rms_norm_reference(r, None, w, 1e-5)[0], RTOL[dtype])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(100) -> inf, on purpose
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,inter", [(1, 48), (3, 1100), (7, 48)])
def test_silu_mul(dtype: torch.dtype, t: int, inter: int) -> None:
    gate_up = _randn(t, 2 * inter, dtype=dtype, seed=3, scale=3.0)
    gate_up[0, :4] = torch.tensor([-100.0, -20.0, 20.0, 100.0])  # saturated sigmoid, no NaN
    out = fused.silu_mul(gate_up)
    assert out.dtype == dtype and out.shape == (t, inter)
    _assert_close(out, fused.silu_mul_reference(gate_up), RTOL[dtype])
    _assert_close(out, fused.silu_mul_reference(gate_up.double()), RTOL[dtype])


def _tiny_model(dtype: torch.dtype, attention_bias: bool = False, arch: str = "llama"
                ) -> LlamaForCausalLM:
    """Two layers with the default model's attention shape (9 heads, 3 KV heads, dim 64)
    (qwen3: q and k head norms; gemma3: those, four norms a layer, GeGLU, a scaled
    embedding and attention, and the first layer's RoPE of the window layers' base; gemma2:
    gemma3's without the head norms and local RoPE, its attention scores soft-capped; phi3:
    a partial rotary embedding, 48 of 64 dims, as Phi-4-mini's; smollm3: no RoPE in the
    second layer; olmo2: q and k normed across their heads, norms after the attention and
    the MLP only; qwen2_moe: 4 experts, 2 a token, and a shared expert; olmoe: those
    experts without the shared one, OLMo's q and k norms)."""
    gemma = arch in ("gemma2", "gemma3")
    moe = arch in ("qwen2_moe", "olmoe")
    config = ModelConfig(arch, vocab_size=64, hidden_size=576, intermediate_size=96,
                         num_layers=2, num_heads=9, num_kv_heads=3, head_dim=64,
                         attention_bias=attention_bias, qk_norm=arch in ("qwen3", "gemma3"),
                         attention_scale=0.1 if gemma else None,
                         local_rope_theta=100.0 if arch == "gemma3" else None,
                         attn_softcap=0.5 if arch == "gemma2" else None,
                         rotary_dim=48 if arch == "phi3" else None,
                         nope_layers=(1,) if arch == "smollm3" else (),
                         num_experts=4 * moe, experts_per_token=2 * moe,
                         expert_intermediate_size=32 * moe,
                         shared_expert_intermediate_size=48 * (arch == "qwen2_moe"),
                         normalize_expert_weights=False)
    model = LlamaForCausalLM(config, dtype, max_positions=64)
    model.layers[0].windowed = arch == "gemma3"  # (no window in these steps: its RoPE only)
    gen = torch.Generator().manual_seed(5)
    for p in model.parameters():
        fan_in = p.shape[-1] if p.dim() == 2 else 25.0  # norm weights: 1 +- 0.2
        p.data.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5 + (p.dim() == 1))
    shape = (4, 4, config.num_kv_heads, config.head_dim)
    model.kv_caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                       for _ in range(config.num_layers)]
    return model


def _run_two_steps(model: LlamaForCausalLM) -> torch.Tensor:
    """Prefill of two sequences (4 and 3 tokens), then one decode token each: hidden of both."""
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    ids = torch.arange(7) * 9 % 64
    step1 = BatchMeta(torch.tensor([0, 1, 2, 3, 8, 9, 10]), tables,
                      torch.tensor([4, 3], dtype=torch.int32), torch.tensor([0, 4, 7], dtype=torch.int32))
    step2 = BatchMeta(torch.tensor([4, 11]), tables, torch.tensor([5, 4], dtype=torch.int32),
                      torch.tensor([0, 1, 2], dtype=torch.int32))
    with torch.inference_mode():
        h1 = model(ids, torch.tensor([0, 1, 2, 3, 0, 1, 2]), step1)
        h2 = model(torch.tensor([5, 6]), torch.tensor([4, 3]), step2)
    return torch.cat([h1, h2])


# relative Frobenius error of the fused path's hidden states and KV caches vs the torch path;
# measured: float32 4.3e-7 (caches <= 3.6e-7), bfloat16 1.3e-2 (caches <= 1.2e-2). bfloat16
# differs by design: the torch path rounds cos/sin and silu(gate) to bfloat16, and the
# interpreter truncates to bfloat16 (against a float32 run of the same weights the torch path
# is 8.0e-3 off, the fused path 1.0e-2, and 7.4e-3 with rounding to nearest as compiled).
MODEL_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _as_sums(x: torch.Tensor) -> tuple[object, torch.Tensor]:
    """(GemvSums holding x rounded to bfloat16, that bfloat16 tensor): what a GEMV hands
    over, and what it would have stored. The values convert exactly both ways, so the
    rounding mode (the interpreter truncates) does not enter."""
    rounded = x.to(torch.bfloat16)
    sums = (rounded.double() * fused.FIXED_ONE).to(torch.int64)
    return fused.GemvSums(sums, torch.bfloat16), rounded


@pytest.mark.parametrize("t,hidden", [(1, 576), (2, 1000)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("as_sums", [True, False])
def test_add_norm_deferred(t: int, hidden: int, with_residual: bool, as_sums: bool) -> None:
    """The deferred norm over slices of the row (3 and 4 programs a row here): the
    weighted row and residual as its reference gives them, and a RowNorm whose partial
    sums of squares give the reference's scale; sums it reads are zeroed."""
    x = _randn(t, hidden, dtype=torch.float32, seed=8, scale=3.0)
    sums, rounded = _as_sums(x)
    residual = _randn(t, hidden, dtype=torch.bfloat16, seed=9) if with_residual else None
    weight = _randn(hidden, dtype=torch.bfloat16, seed=10, scale=0.2) + 1
    weighted, residual_out, norm = fused.add_norm_deferred(sums if as_sums else rounded,
                                                           residual, weight, 1e-5)
    ref_weighted, ref_residual, ref_scale = fused.add_norm_deferred_reference(
        rounded, residual, weight, 1e-5)
    _assert_close(residual_out, ref_residual, RTOL[torch.bfloat16])
    # the weighting of the kernel's own residual_out (an ulp off the reference's at most)
    _assert_close(weighted, fused.add_norm_deferred_reference(residual_out, None, weight,
                                                             1e-5)[0], RTOL[torch.bfloat16])
    _assert_close(weighted, ref_weighted, 2 * RTOL[torch.bfloat16])
    assert norm.partials.shape == (t, -(-hidden // fused.DEFERRED_BLOCK)) and norm.width == hidden
    scale = torch.rsqrt(norm.partials.double().sum(1, keepdim=True) / hidden + norm.eps)
    _assert_close(scale, ref_scale, 2.0**-7)  # (the kernel squares its own residual_out)
    if as_sums:
        assert int(sums.sums.abs().sum()) == 0
        with pytest.raises(ValueError, match="RowNorm"):
            fused.add_norm_deferred(fused.GemvSums(sums.sums, torch.bfloat16, norm), None,
                                    weight, 1e-5)


def test_kernels_scale_sums_by_their_row_norm() -> None:
    """Sums with a RowNorm reach each fused kernel scaled by their row's rsqrt(sum of the
    partials / width + eps): bit for bit what the kernel gives for the scaled rows as a
    tensor. (The scales are powers of two, so scaling is exact and no rounding enters.)"""
    t, heads, kv_heads, head_dim = 2, 4, 2, 16
    partials = torch.tensor([[64.0, 64.0, 128.0], [10.0, 2.0, 4.0]])  # mean squares 4, 1/4
    norm = fused.RowNorm(partials, 64, 0.0)
    scale = torch.tensor([[0.5], [2.0]], dtype=torch.float64)

    def scaled(x: torch.Tensor) -> tuple[object, torch.Tensor]:
        sums, rounded = _as_sums(x)
        return (fused.GemvSums(sums.sums, torch.bfloat16, norm),
                (rounded.double() * scale).to(torch.bfloat16))

    sums, expect = scaled(_randn(t, 2 * 48, dtype=torch.float32, seed=11, scale=3.0))
    assert torch.equal(fused.silu_mul(sums), fused.silu_mul(expect))
    assert int(sums.sums.abs().sum()) == 0

    sums, expect = scaled(_randn(t, 64, dtype=torch.float32, seed=12, scale=3.0))
    weight = _randn(64, dtype=torch.bfloat16, seed=13, scale=0.2) + 1
    got = fused.add_rms_norm(sums, None, weight, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(got, fused.add_rms_norm(expect, None, weight,
                                                                         1e-5), strict=True))

    width = (heads + 2 * kv_heads) * head_dim
    sums, expect = scaled(_randn(t, width, dtype=torch.float32, seed=14))
    positions, slots = torch.tensor([5, 9]), torch.tensor([3, 6])
    cos, sin = torch.rand(16, head_dim // 2), torch.rand(16, head_dim // 2)
    caches = [torch.zeros(2, 4, kv_heads, head_dim, dtype=torch.bfloat16) for _ in range(4)]
    got = rope.rope_kv_write(sums, positions, cos, sin, caches[0], caches[1], slots, heads,
                              kv_heads)
    want = rope.rope_kv_write(expect, positions, cos, sin, caches[2], caches[3], slots, heads,
                               kv_heads)
    q_k = (heads + kv_heads) * head_dim
    assert torch.equal(got[:, :q_k], want[:, :q_k])
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert int(sums.sums.abs().sum()) == 0


@pytest.mark.parametrize("with_residual", [True, False])
def test_kernels_take_gemv_sums(with_residual: bool) -> None:
    """Each fused kernel given a GEMV's fixed-point sums (`GemvSums`) gives what it gives
    for the bfloat16 tensor the GEMV would have stored, bit for bit, and zeroes the sums."""
    t, hidden, heads, kv_heads, head_dim = 1, 64, 4, 2, 16
    x = _randn(t, hidden, dtype=torch.float32, seed=3, scale=3.0)
    sums, rounded = _as_sums(x)
    residual = _randn(t, hidden, dtype=torch.bfloat16, seed=4) if with_residual else None
    weight = _randn(hidden, dtype=torch.bfloat16, seed=5, scale=0.2) + 1
    got, expect = fused.add_rms_norm(sums, residual, weight, 1e-5), fused.add_rms_norm(
        rounded, residual, weight, 1e-5)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    assert int(sums.sums.abs().sum()) == 0

    sums, rounded = _as_sums(_randn(3, 2 * hidden, dtype=torch.float32, seed=6))
    assert torch.equal(fused.silu_mul(sums), fused.silu_mul(rounded))
    assert int(sums.sums.abs().sum()) == 0

    width = (heads + 2 * kv_heads) * head_dim
    sums, rounded = _as_sums(_randn(2, width, dtype=torch.float32, seed=7))
    positions, slots = torch.tensor([5, 9]), torch.tensor([3, 6])
    cos, sin = torch.rand(16, head_dim // 2), torch.rand(16, head_dim // 2)
    caches = [torch.zeros(2, 4, kv_heads, head_dim, dtype=torch.bfloat16) for _ in range(4)]
    got = rope.rope_kv_write(sums, positions, cos, sin, caches[0], caches[1], slots, heads,
                              kv_heads)
    expect = rope.rope_kv_write(rounded, positions, cos, sin, caches[2], caches[3], slots,
                                 heads, kv_heads)
    q_k = (heads + kv_heads) * head_dim  # (the v heads of a GemvSums result stay unwritten)
    assert torch.equal(got[:, :q_k], expect[:, :q_k])
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert int(sums.sums.abs().sum()) == 0


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma2", "gemma3", "smollm3",
                                  "olmo2", "qwen2_moe", "olmoe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_forward_matches_torch_path(dtype: torch.dtype, arch: str) -> None:
    if dtype == torch.bfloat16 and arch in ("qwen2_moe", "olmoe"):  # (routing is a choice:
        # a near tie between experts in bfloat16 rounding went the other way for one token
        # of qwen2_moe's, 0.056 off overall, not a kernel's error)
        pytest.skip("mixture-of-experts routing compared in float32")
    torch_model, fused_model = _tiny_model(dtype, arch=arch), _tiny_model(dtype, arch=arch)
    fused_model.fused_kernels = True
    expected, got = _run_two_steps(torch_model), _run_two_steps(fused_model)
    pairs = [(got, expected)] + [
        (a, b) for kv, ref in zip(fused_model.kv_caches, torch_model.kv_caches, strict=True)
        for a, b in zip(kv, ref, strict=True)
    ]
    for a, b in pairs:
        rel = float((a.double() - b.double()).norm() / b.double().norm())
        assert rel < MODEL_TOL[dtype], rel


@pytest.mark.parametrize("attention_bias", [False, True])
def test_decode_hands_packed_gemv_sums_to_the_fused_kernels(monkeypatch,
                                                             attention_bias: bool) -> None:
    """Batch-1 decode of a packed model on CUDA leaves every projection's sums unrounded
    for the next fused kernel (`Linear.project`), the norms' scales deferred to the
    kernels after qkv and gate/up (`Linear.after_norm`). The same path runs here, interpreted,
    with the mma GEMV emulated and allowed on CPU, against the CPU's packed kernels: the
    hidden states agree within bfloat16 rounding, and each GEMV handed over its sums. A qkv
    projection with a bias (Qwen2) takes the plain norm and GEMV; the rest as before."""
    from kernels import gemv_sums
    from kernels.triton_gemm import words_of
    from server.models.quantize import linear_modules, quantize_dense

    def run(model: LlamaForCausalLM) -> torch.Tensor:
        table = torch.tensor([[0, 1]], dtype=torch.int32)
        with torch.inference_mode():
            model(torch.tensor([3, 9, 27, 17]), torch.arange(4), BatchMeta(
                torch.arange(4), table, torch.tensor([4], dtype=torch.int32),
                torch.tensor([0, 4], dtype=torch.int32)))
            return model(torch.tensor([40]), torch.tensor([4]), BatchMeta(  # decode at 4
                torch.tensor([4]), table, torch.tensor([5], dtype=torch.int32),
                torch.tensor([0, 1], dtype=torch.int32)))

    models = [_tiny_model(torch.bfloat16, attention_bias) for _ in range(2)]
    for model in models:
        model.fused_kernels = True
        for _, lin in linear_modules(model):
            lin.set_packed(quantize_dense(lin.weight, "int4"))
    calls = []

    def sums_on_cpu(x, packed):
        calls.append(packed.out_features)
        return real(x, words_of(packed), {"BLOCK_N": 32, "split_k": 3, "num_warps": 1})

    def deferred(*args):
        norms.append(args[0].shape)
        return real_norm(*args)

    real, real_norm, norms = gemv_sums.mma_gemv_sums, fused.add_norm_deferred, []
    monkeypatch.setattr(gemv_sums, "mma_gemv_sums_supported", lambda x, p: True)
    monkeypatch.setattr(gemv_sums, "mma_gemv_sums", sums_on_cpu)
    monkeypatch.setattr(fused, "add_norm_deferred", deferred)
    got = run(models[0])
    # qkv, o, gate/up, down of 2 layers, and the norms before qkv and gate/up (scales
    # deferred); with a qkv bias, neither qkv's sums nor its norm's
    assert calls == ([576, 192, 576] if attention_bias else [960, 576, 192, 576]) * 2
    assert len(norms) == (2 if attention_bias else 4)
    monkeypatch.setattr(gemv_sums, "mma_gemv_sums_supported", lambda x, p: False)
    expected = run(models[1])
    rel = float((got.double() - expected.double()).norm() / expected.double().norm())
    assert rel < 2e-2, rel
    assert int(gemv_sums._sums[torch.device("cpu")].abs().sum()) == 0


def test_pdl_only_where_supported_and_switchable():
    """Programmatic dependent launch (inline PTX) stays off on CPU and under the interpreter;
    `disabled()` turns it off for a block and restores the previous setting."""
    from kernels import pdl

    assert os.environ["TRITON_INTERPRET"] == "1"
    assert not pdl.use_pdl(torch.device("cpu"))
    assert pdl.pdl_args(torch.device("cpu")) == {"PDL": False}
    before = pdl.ENABLED.on
    for setting in (True, False):
        pdl.ENABLED.on = setting
        with pdl.disabled():
            assert not pdl.ENABLED
        assert pdl.ENABLED.on is setting
    pdl.ENABLED.on = before
