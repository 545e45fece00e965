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
