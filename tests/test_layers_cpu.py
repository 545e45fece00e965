"""The CPU's float32 products of a few rows (`server.models.layers.dense_linear`): the
weight's output features split into blocks that one batched product spreads over the
threads. Same values as F.linear (the same bits at one row), and the split taken exactly
where it is meant to be."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.models import layers


@pytest.mark.parametrize(("n", "k", "dtype"), [(960, 576, torch.float32),
                                               (576, 1536, torch.float32),
                                               (1002, 64, torch.float32),  # N % 4 != 0
                                               (960, 576, torch.bfloat16)])
def test_split_products_match_f_linear(n, k, dtype, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *args: calls.append(1) or bmm(*args))
    for m in (1, 2, 3, 5, 8, 16, 17, 64):
        x = torch.randn(m, k, generator=gen).to(dtype)
        calls.clear()
        out = layers.dense_linear(x, w, bias)
        split = m <= 16 and dtype == torch.float32 and n % 4 == 0  # (the documented rule)
        assert bool(calls) == split, (m, n, dtype)
        torch.testing.assert_close(out, F.linear(x, w, bias), rtol=1e-5, atol=1e-4)
        if m == 1:
            assert torch.equal(layers.dense_linear(x, w), F.linear(x, w))
    x = torch.randn(1, k, generator=gen).to(dtype)
    logits = layers.dense_linear(x, w, out_dtype=torch.float64)
    assert logits.dtype == torch.float64 and logits.shape == (1, n)
