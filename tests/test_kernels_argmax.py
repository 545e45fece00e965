"""The greedy-token argmax kernel (interpreted on CPU) against torch.argmax, exactly:
random rows, ties planted across slice boundaries (the lowest index wins), all-equal rows,
-inf, NaN, every input dtype. Outputs are poisoned so an unwritten row fails, and each case
runs twice so the second call finds its counters reset."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

argmax = pytest.importorskip("kernels.triton_argmax")


def _check(logits: torch.Tensor, block: int | None = None) -> None:
    ref = logits.argmax(dim=-1)
    for _ in range(2):  # the second call needs the counters the first one left at zero
        out = torch.full((logits.shape[0],), -7, dtype=torch.int64)
        argmax.triton_argmax(logits, out, block)
        assert torch.equal(out, ref), (out, ref)
    assert int(argmax._tile_counters(logits.device, 1).abs().sum()) == 0


@pytest.mark.parametrize("rows,vocab,block", [
    (r, v, b) for r in (1, 5) for v, b in ((1000, None), (1000, 128), (3000, 256), (1, None))
] + [(1, 49152, None), (2, 49152, None)])
def test_random_rows(rows, vocab, block):
    """One slice (1000, 1), ragged last slices (1000 / 128, 3000 / 256), 48 slices of 1024."""
    g = torch.Generator().manual_seed(rows * vocab)
    _check(torch.randn(rows, vocab, generator=g), block)


def test_ties_across_slices_take_the_lowest_index():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g)
    logits[0, [127, 128, 999]] = 9.0  # either side of a slice boundary, and the last column
    logits[1, [999, 500]] = 9.0
    logits[2, [0, 128 * 7]] = 9.0  # first and last slice
    logits[3] = 1.5  # every element equal
    logits[4, [130, 131, 129]] = 9.0  # within one slice
    logits[5] = float("-inf")
    logits[5, [300, 600]] = -1e30
    _check(logits, block=128)


def test_negative_infinity():
    logits = torch.full((3, 700), float("-inf"))
    logits[1, 650] = -3.0
    logits[2, 100:] = torch.linspace(-5, -1, 600)
    logits[2, 90] = float("inf")
    _check(logits, block=64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_with_ties(dtype):
    """bf16 rounds many random logits to equal values: ties in every row."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(4, 2000, generator=g) * 3).round().to(dtype)
    _check(logits, block=256)
    _check(logits)


def test_nan_is_the_maximum_like_torch():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 1000, generator=g)
    logits[0, 700] = float("nan")
    logits[1, [900, 30]] = float("nan")  # the first NaN, in another slice
    logits[2, 5] = float("inf")
    logits[2, 6] = float("nan")
    logits[3] = float("nan")
    _check(logits, block=128)


def test_strided_rows_and_no_rows():
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(3, 1200, generator=g)
    _check(wide[:, :1000], block=128)  # row stride 1200
    assert argmax.triton_argmax(wide[:0]).shape == (0,)
    with pytest.raises(ValueError, match="2-D"):
        argmax.triton_argmax(wide[0])


def test_greedy_tokens_is_torch_on_cpu():
    logits = torch.randn(2, 50)
    assert torch.equal(argmax.greedy_tokens(logits), logits.argmax(dim=-1))


def test_slice_widths():
    assert [argmax.slice_width(v) for v in (1000, 49152, 128256, 151936, 262144)] == [
        1024, 1024, 1024, 2048, 2048]
