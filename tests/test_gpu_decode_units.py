"""CPU checks of the GPU decode benchmark's helpers."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402

gpu_decode = pytest.importorskip("server.benchmarks.gpu_decode")  # (needs triton)
label_linears = gpu_decode.label_linears


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


def test_marginal_times_count_how_far_each_kernel_moves_the_end():
    """Kernels overlapping under PDL: each counts only the time by which it moves the latest
    end of the kernels before it; the totals add up to the span, per step."""
    events = [("gemv", 0.0, 10.0), ("norm", 8.0, 12.0),  # starts during gemv: 2 beyond it
              ("gemv", 9.0, 30.0), ("rope", 11.0, 25.0),  # rope ends within gemv: 0
              ("norm", 31.0, 33.0)]  # after a gap of 1, which it counts
    rows = gpu_decode.marginal_times(events, steps=2)
    assert rows == [("gemv", 1.0, 14.0), ("norm", 1.0, 2.5), ("rope", 0.5, 0.0)]
    assert sum(t for _, _, t in rows) * 2 == 33.0


def test_tuned_configs_name_their_keys():
    """The benchmarks' record of the autotuners' picks: each entry names its kernel, the
    key arguments by name and the configuration's parameters, JSON-serializable."""
    import json

    import triton

    from kernels.bench_gpu import tuned_configs
    from kernels.triton_mma_gemv import _mma_tuned, _sums_tuned

    key = (4096, 14336, 128, 4, True, "torch.bfloat16")
    sums_key = (6144, 4096, 128, False, "torch.bfloat16")
    _mma_tuned.cache[key] = triton.Config({"BLOCK_N": 64, "split_k": 16, "WARPS_K": 1},
                                          num_warps=2, num_stages=1)
    _sums_tuned.cache[sums_key] = triton.Config({"BLOCK_N": 32, "split_k": 8, "WARPS_K": 1},
                                                num_warps=1, num_stages=1)
    try:
        entries = [e for e in tuned_configs() if e["kernel"].startswith("mma_gemv")]
    finally:
        del _mma_tuned.cache[key], _sums_tuned.cache[sums_key]
    assert entries == [{"kernel": "mma_gemv",
                        "key": {"N": 4096, "K": 14336, "GROUP": 128, "M_KEY": 4,
                                "INT8": True},
                        "config": {"BLOCK_N": 64, "split_k": 16, "WARPS_K": 1,
                                   "num_warps": 2, "num_ctas": 1, "num_stages": 1}},
                       {"kernel": "mma_gemv_sums",
                        "key": {"N": 6144, "K": 4096, "GROUP": 128, "INT8": False},
                        "config": {"BLOCK_N": 32, "split_k": 8, "WARPS_K": 1,
                                   "num_warps": 1, "num_ctas": 1, "num_stages": 1}}]
    json.dumps(entries)
