"""CPU checks of the GPU decode benchmark's helpers."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402

label_linears = pytest.importorskip("server.benchmarks.gpu_decode").label_linears  # triton


def test_label_linears_by_launch_order():
    """Two steps of a two-layer model: the GEMV kernel's launches are labelled by layer in
    launch order; other kernels (several a layer, or one a step) keep their names."""
    step = []
    for _ in range(2):
        step += ["norm", "gemv", "rope", "attn", "gemv", "norm", "gemv", "gemv"]
    step += ["norm", "gemv", "argmax"]
    labels = label_linears(step * 2, steps=2, layers=2)
    layer = ["gemv [qkv]", "gemv [o]", "gemv [gate_up]", "gemv [down]"]
    assert [name for name in labels if name.startswith("gemv")] == (
        layer * 2 + ["gemv [lm_head]"]) * 2
    assert [name for name in labels if not name.startswith("gemv")] == [
        name for name in step * 2 if name != "gemv"]
