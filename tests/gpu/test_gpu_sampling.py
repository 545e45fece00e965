"""Token selection on a CUDA device at real sizes (skipped without one): the greedy argmax
and the sampling race, against their references."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("rows", [1, 4, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_llama3_vocab(rows, dtype):
    """The greedy-token kernel at Llama 3's vocabulary (126 slices) equals torch.argmax:
    random rows, a tie across slices (lowest index wins), an all-equal row, a NaN (torch's
    maximum); twice, so the second call finds the counters reset; outputs poisoned."""
    from kernels.triton_argmax import triton_argmax

    logits = torch.randn(rows, 128256, device="cuda").to(dtype)
    logits[0, [90000, 5000, 5001]] = 100.0
    if rows > 1:
        logits[1] = 0.5
        logits[-1, [77777, 100000]] = float("nan")
    for _ in range(2):
        out = torch.full((rows,), -1, dtype=torch.int64, device="cuda")
        assert torch.equal(triton_argmax(logits, out), logits.argmax(dim=-1))


def test_argmax_captured_after_a_pdl_kernel():
    """Captured in a CUDA graph right after the GEMV that writes its logits (with PDL, its
    programs start during the GEMV's tail and must wait before loading), and beside a
    64-row call; replayed twice with new inputs, outputs poisoned before each replay."""
    from kernels.triton_argmax import greedy_tokens
    from kernels.triton_dense_gemv import dense_gemv

    vocab, hidden = 128256, 576
    w = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    rows = torch.randn(64, vocab, device="cuda")
    config = {"BLOCK_N": 32, "BLOCK_K": 128, "split_k": 1}

    def step():
        logits = dense_gemv(x, w, torch.float32, config)
        return logits, greedy_tokens(logits), greedy_tokens(rows)

    step()  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits, tokens, row_tokens = step()
    for seed in (1, 2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x.copy_(torch.randn(x.shape, device="cuda", generator=gen))
        rows.copy_(torch.randn(rows.shape, device="cuda", generator=gen))
        tokens.fill_(-1)
        row_tokens.fill_(-1)
        graph.replay()
        assert torch.equal(tokens, logits.argmax(dim=-1)), seed
        assert torch.equal(row_tokens, rows.argmax(dim=-1)), seed


def test_race_scores_match_the_reference():
    """The Gumbel race's scores on CUDA (libdevice's float64 log) against the CPU reference:
    within one float32 rounding, and the same winners."""
    from kernels.sampling import race_scores_reference
    from kernels.triton_sample import race_scores

    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 49152, generator=g) * 4
    t = torch.rand(16, generator=g) + 0.2
    seeds, positions = torch.arange(16) * 977 - 3000, torch.arange(16) * 13
    ref = race_scores_reference(x, t, seeds, positions)
    out = race_scores(x.cuda(), t.cuda(), seeds.cuda(), positions.cuda()).cpu()
    torch.testing.assert_close(out, ref, rtol=2e-7, atol=1e-6)
    assert torch.equal(out.argmax(dim=-1), ref.argmax(dim=-1))
