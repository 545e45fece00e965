"""The fused RoPE + KV-cache write kernel (`kernels.triton_rope`, interpreted on CPU) against
its torch reference: whole and partial rotary embeddings, with and without the head norms
before the turn, within the tolerances of `tests.test_kernels_fused` (one ulp of the output
dtype per element)."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.test_kernels_fused import DTYPES, RTOL, _assert_close, _randn  # noqa: E402

rope = pytest.importorskip("kernels.triton_rope")


def _rope_inputs(t: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """qkv, positions, cos/sin tables, NaN-filled caches (5 blocks of 4) and distinct slots."""
    gen = torch.Generator().manual_seed(t * head_dim)
    qkv = _randn(t, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=4, scale=2.0)
    positions = torch.randint(0, 100, (t,), generator=gen)
    freqs = torch.outer(torch.arange(100.0), 1e-4 ** (torch.arange(0, head_dim, 2) / head_dim))
    cache = torch.full((5, 4, kv_heads, head_dim), float("nan"), dtype=dtype)
    slots = torch.randperm(20, generator=gen)[:t]
    return qkv, positions, freqs.cos(), freqs.sin(), cache, cache.clone(), slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 2, 128)])
@pytest.mark.parametrize("t", [1, 3, 7])
def test_rope_kv_write(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, t: int) -> None:
    qkv, positions, cos, sin, k_cache, v_cache, slots = _rope_inputs(t, heads, kv_heads, head_dim, dtype)
    original = qkv.clone()
    ref = [qkv.clone(), k_cache.clone(), v_cache.clone()]
    exact = [qkv.double(), k_cache.double(), v_cache.double()]
    rope.rope_kv_write(qkv, positions, cos, sin, k_cache, v_cache, slots, heads, kv_heads)
    rope.rope_kv_write_reference(ref[0], positions, cos, sin, ref[1], ref[2], slots, heads, kv_heads)
    rope.rope_kv_write_reference(exact[0], positions, cos, sin, exact[1], exact[2], slots, heads,
                                  kv_heads)
    v_start = (heads + kv_heads) * head_dim
    assert torch.equal(qkv[:, v_start:], original[:, v_start:])  # v heads are not touched
    written = torch.zeros(20, dtype=torch.bool)
    written[slots] = True
    for got, want, truth in zip((qkv, k_cache, v_cache), ref, exact, strict=True):
        if got is not qkv:  # every written slot matches; every other slot still holds NaN
            assert got.view(20, -1)[~written].isnan().all()
            got, want, truth = (c.view(20, -1)[written] for c in (got, want, truth))
        _assert_close(got, want, RTOL[dtype])
        _assert_close(got, truth, RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,rot", [(9, 3, 64, 32), (4, 2, 128, 96)])
@pytest.mark.parametrize("normed", [False, True])
def test_rope_kv_write_partial_rotary(dtype: torch.dtype, heads: int, kv_heads: int,
                                      head_dim: int, rot: int, normed: bool) -> None:
    """A partial rotary embedding (Phi-4-mini's 96 of 128 dims): each head's first rot dims
    turn, the rest pass (normed with the head where there is a head norm), in qkv and the
    caches, against the reference; the turned and passed dims differ from the plain turn's."""
    t = 3
    qkv, positions, cos, sin, k_cache, v_cache, slots = _rope_inputs(t, heads, kv_heads,
                                                                     head_dim, dtype)
    cos, sin = cos[:, : rot // 2], sin[:, : rot // 2]
    norm = (_randn(2 * head_dim, dtype=dtype, seed=12, scale=0.3) + 1, 1e-6) if normed else None
    original = qkv.clone()
    ref = [qkv.clone(), k_cache.clone(), v_cache.clone()]
    rope.rope_kv_write(qkv, positions, cos, sin, k_cache, v_cache, slots, heads, kv_heads, norm)
    rope.rope_kv_write_reference(ref[0], positions, cos, sin, ref[1], ref[2], slots, heads,
                                  kv_heads, norm)
    v_start = (heads + kv_heads) * head_dim
    assert torch.equal(qkv[:, v_start:], original[:, v_start:])
    if not normed:  # the dims past rot pass as they are
        heads_of = qkv[:, :v_start].view(t, -1, head_dim)
        assert torch.equal(heads_of[..., rot:], original[:, :v_start].view(t, -1, head_dim)[
            ..., rot:])
    pairs = [(qkv[:, :v_start], ref[0][:, :v_start])] + [
        (got.view(20, -1)[slots], want.view(20, -1)[slots])
        for got, want in zip((k_cache, v_cache), ref[1:], strict=True)]
    for got, want in pairs:
        if dtype == torch.bfloat16 and normed:  # (see the next test: truncating rounding)
            err = (got.double() - want.double()).norm() / want.double().norm()
            assert err < 2e-2, err
        else:
            _assert_close(got, want, RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 2, 128)])
def test_rope_kv_write_norms_heads_first(dtype: torch.dtype, heads: int, kv_heads: int,
                                         head_dim: int) -> None:
    """Qwen3's head norms before the turn (q's heads with the weight's first half, k's
    with its second): q, k and the cache against the reference, per element within RTOL in
    float32 and float16; in bfloat16, whose rounding the interpreter does by truncation
    (three times a head here against the reference's rounding to nearest), a relative
    Frobenius error within 2e-2 (measured 0.94-1.03e-2)."""
    t = 3
    qkv, positions, cos, sin, k_cache, v_cache, slots = _rope_inputs(t, heads, kv_heads,
                                                                     head_dim, dtype)
    weight = _randn(2 * head_dim, dtype=dtype, seed=12, scale=0.3) + 1
    original = qkv.clone()
    ref = [qkv.clone(), k_cache.clone(), v_cache.clone()]
    rope.rope_kv_write(qkv, positions, cos, sin, k_cache, v_cache, slots, heads, kv_heads,
                        (weight, 1e-6))
    rope.rope_kv_write_reference(ref[0], positions, cos, sin, ref[1], ref[2], slots, heads,
                                  kv_heads, (weight, 1e-6))
    plain = original.clone()
    rope.rope_kv_write_reference(plain, positions, cos, sin, k_cache.clone(),
                                  v_cache.clone(), slots, heads, kv_heads)
    v_start = (heads + kv_heads) * head_dim
    assert torch.equal(qkv[:, v_start:], original[:, v_start:])
    assert not torch.allclose(qkv[:, :v_start].float(), plain[:, :v_start].float(), rtol=0.1)
    pairs = [(qkv[:, :v_start], ref[0][:, :v_start])] + [
        (got.view(20, -1)[slots], want.view(20, -1)[slots])
        for got, want in zip((k_cache, v_cache), ref[1:], strict=True)]
    for got, want in pairs:
        if dtype == torch.bfloat16:
            err = (got.double() - want.double()).norm() / want.double().norm()
            assert err < 2e-2, err
        else:
            _assert_close(got, want, RTOL[dtype])
