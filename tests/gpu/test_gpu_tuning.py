"""`kernels.tune_gpu` on a CUDA device (skipped without one): it tables every decode GEMV of a
small model, and the kernels then launch those configurations with correct results."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 512,
          "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 8,
          "num_key_value_heads": 2, "rms_norm_eps": 1e-5}


def test_tuned_table_drives_the_kernels(tmp_path, monkeypatch):
    from kernels import gemv_table, tune_gpu
    from kernels.gemm import quantized_linear_reference
    from kernels.gemv_sums import _sums, mma_gemv_sums
    from kernels.quant import quantize_int4, to_words
    from kernels.triton_dense_gemv import dense_gemv
    from kernels.triton_fused import FIXED_ONE
    from kernels.triton_mma_gemv import candidates, mma_gemv

    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    table = tmp_path / "table.json"
    tune_gpu.main(["--config", str(tmp_path / "config.json"), "--schemes", "int4", "bf16",
                   "--rows", "1", "9", "--out", str(table)])
    assert all(int(b.abs().sum()) == 0 for b in _sums.values())  # timing left no sums
    data = json.loads(table.read_text())
    assert data["device"] == torch.cuda.get_device_name() and len(data["runs"]) == 1
    kinds = {(e["kernel"], e["key"].get("M_KEY")) for e in data["entries"]}
    assert kinds == {("mma_gemv", 4), ("mma_gemv", 9), ("mma_gemv_sums", None),
                     ("dense_gemv", None)}
    assert len(data["entries"]) == 5 + 5 + 4 + 5  # 5 projections; no sums for the head
    for e in data["entries"]:
        assert e["us"] > 0
        if e["kernel"] != "dense_gemv":
            key = e["key"]
            assert e["config"] in candidates(key["N"], key["K"], key["GROUP"], key["INT8"],
                                             key.get("M_KEY", 4))

    monkeypatch.setenv("LEAPFROG_GEMV_TABLE", str(table))
    gemv_table._device_table.cache_clear()
    try:
        cuda = torch.device("cuda")
        packed = to_words(quantize_int4(torch.randn(2048, 512, device="cuda") * 0.02, 128))
        key = dict(N=2048, K=512, GROUP=128, INT8=False)  # the fused gate/up projection
        for m in (1, 9):
            assert gemv_table.lookup("mma_gemv", cuda, **key, M_KEY=max(m, 4)) is not None
            x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
            ref = quantized_linear_reference(x.float(), packed)
            out = torch.full((m, 2048), float("nan"), device="cuda", dtype=torch.bfloat16)
            mma_gemv(x, packed, out)
            assert float((out.float() - ref).norm() / ref.norm()) < 1.5e-2, m
        assert gemv_table.lookup("mma_gemv_sums", cuda, **key) is not None
        sums = mma_gemv_sums(x[:1], packed)
        got = sums.sums.double() / FIXED_ONE
        sums.sums.zero_()  # (what the next fused kernel does)
        assert float((got - ref[:1].double()).norm() / ref[:1].double().norm()) < 1e-4
        # the o projection: the dense GEMV without a prologue
        assert gemv_table.lookup("dense_gemv", cuda, N=512, K=512, PROLOGUE=0) is not None
        x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16) * 0.02
        ref = x.float() @ w.float().T
        assert float((dense_gemv(x, w).float() - ref).norm() / ref.norm()) < 1e-2
    finally:
        gemv_table._device_table.cache_clear()
