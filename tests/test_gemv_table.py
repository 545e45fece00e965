"""Per-device GEMV tables (`kernels.gemv_table`): reading and writing them, the kernels
launching a tabled configuration instead of autotuning, and the shipped tables holding only
configurations the autotuner could pick."""

from __future__ import annotations

import json
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import gemv_table  # noqa: E402
from kernels.gemm import quantized_linear_reference  # noqa: E402
from kernels.quant import PackedWeight, pack_int4, to_words  # noqa: E402

pytest.importorskip("triton")

ENTRY = {"kernel": "mma_gemv", "key": {"N": 64, "K": 256, "GROUP": 128, "INT8": False,
                                       "M_KEY": 4},
         "config": {"BLOCK_N": 64, "split_k": 2, "num_warps": 2, "WARPS_K": 1, "ROWS": 4},
         "us": 1.0}


@pytest.fixture
def table_file(tmp_path, monkeypatch):
    """A table at a temporary path, which LEAPFROG_GEMV_TABLE names."""
    path = tmp_path / "t.json"
    monkeypatch.setenv("LEAPFROG_GEMV_TABLE", str(path))
    gemv_table._device_table.cache_clear()
    yield path
    gemv_table._device_table.cache_clear()


def test_write_merges_by_key_and_lookup_finds_it(table_file):
    other = dict(ENTRY, key=dict(ENTRY["key"], M_KEY=9), config=dict(ENTRY["config"], ROWS=16))
    gemv_table.write_table(table_file, "GPU X", {"run": 1}, [ENTRY, other])
    newer = dict(ENTRY, config=dict(ENTRY["config"], split_k=4))
    gemv_table.write_table(table_file, "GPU X", {"run": 2}, [newer])
    data = json.loads(table_file.read_text())
    assert data["device"] == "GPU X" and data["runs"] == [{"run": 1}, {"run": 2}]
    assert len(data["entries"]) == 2  # the newer entry replaced the one of its key

    cuda = torch.device("cuda", 0)
    key = dict(N=64, K=256, GROUP=128, INT8=False)
    assert gemv_table.lookup("mma_gemv", cuda, **key, M_KEY=4)["split_k"] == 4
    assert gemv_table.lookup("mma_gemv", cuda, **key, M_KEY=9)["ROWS"] == 16
    assert gemv_table.lookup("mma_gemv", cuda, **key, M_KEY=5) is None
    assert gemv_table.lookup("mma_gemv_sums", cuda, **key) is None  # another kernel
    assert gemv_table.lookup("mma_gemv", torch.device("cpu"), **key, M_KEY=4) is None
    with gemv_table.disabled():
        assert gemv_table.lookup("mma_gemv", cuda, **key, M_KEY=4) is None
    gemv_table.lookup("mma_gemv", cuda, **key, M_KEY=4)["split_k"] = 8  # a copy
    assert gemv_table.lookup("mma_gemv", cuda, **key, M_KEY=4)["split_k"] == 4


def test_off_malformed_and_missing_tables(table_file, monkeypatch):
    table_file.write_text(json.dumps({"device": "GPU X", "runs": [],
                                      "entries": [dict(ENTRY, kernel="gemm")]}))
    with pytest.raises(ValueError, match="malformed.*gemm"):
        gemv_table.lookup("mma_gemv", torch.device("cuda", 0), N=64)
    monkeypatch.setenv("LEAPFROG_GEMV_TABLE", "off")
    gemv_table._device_table.cache_clear()
    assert gemv_table.lookup("mma_gemv", torch.device("cuda", 0), N=64) is None
    monkeypatch.setenv("LEAPFROG_GEMV_TABLE", str(table_file.with_name("missing.json")))
    gemv_table._device_table.cache_clear()
    with pytest.raises(ValueError, match="missing.json, which is not a file"):
        gemv_table.lookup("mma_gemv", torch.device("cuda", 0), N=64)


def test_table_path_names_the_device():
    assert gemv_table.table_path("NVIDIA H200").name == "NVIDIA_H200.json"
    assert gemv_table.table_path("NVIDIA H100 80GB HBM3").name == "NVIDIA_H100_80GB_HBM3.json"


def _int4(n: int, k: int) -> PackedWeight:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k), generator=g).to(torch.uint8)
    scales = (2.0 ** torch.randint(-3, 1, (n, k // 128), generator=g)).half()
    offsets = torch.randint(-8, 1, (n, k // 128), generator=g).half()
    return to_words(PackedWeight("int4", n, k, 128, pack_int4(q), scales, offsets))


def test_kernels_launch_the_tabled_configuration(monkeypatch):
    """Without a config argument, the mma GEMV (merging or handing its sums on) and the
    dense GEMV ask the table with their tuner's key and launch what it returns (exact
    products on integer data; a configuration the kernel refuses shows it was used)."""
    from kernels.gemv_sums import mma_gemv_sums
    from kernels.triton_dense_gemv import dense_gemv
    from kernels.triton_fused import FIXED_ONE
    from kernels.triton_mma_gemv import mma_gemv

    asked = []
    tabled = {"mma_gemv": ENTRY["config"], "mma_gemv_sums": dict(ENTRY["config"], split_k=3),
              "dense_gemv": {"BLOCK_N": 16, "BLOCK_K": 64, "split_k": 3}}

    def lookup(kernel, device, **key):
        asked.append((kernel, key))
        return dict(tabled[kernel])

    monkeypatch.setattr(gemv_table, "lookup", lookup)
    packed = _int4(64, 256)
    x = torch.randint(-4, 5, (3, 256)).to(torch.bfloat16)
    ref = quantized_linear_reference(x.float(), packed)
    out = torch.full((3, 64), float("nan"))
    assert torch.equal(mma_gemv(x, packed, out), ref)
    sums = mma_gemv_sums(x, packed)
    assert torch.equal(sums.sums.double() / FIXED_ONE, ref.double())
    sums.sums.zero_()  # (what the next fused kernel does)
    w = torch.randint(-3, 4, (40, 256)).to(torch.bfloat16)
    assert torch.equal(dense_gemv(x[:1], w, torch.float32), x[:1].float() @ w.float().T)
    key = dict(N=64, K=256, GROUP=128, INT8=False)
    assert asked == [("mma_gemv", key | {"M_KEY": 4}), ("mma_gemv_sums", key),
                     ("dense_gemv", dict(N=40, K=256, PROLOGUE=0))]

    tabled["mma_gemv"] = dict(ENTRY["config"], num_warps=3)
    with pytest.raises(ValueError, match="num_warps"):
        mma_gemv(x, packed, out)


def test_shipped_tables_hold_configurations_the_tuner_could_pick():
    """Every entry of every table in the package is a candidate of its key's tuner
    (`candidates` / `dense_candidates`): a table never launches what the autotuner would
    have pruned, such as a group of rows that does not fit the product."""
    from kernels.triton_dense_gemv import dense_candidates
    from kernels.triton_mma_gemv import candidates

    tables = sorted(gemv_table.TABLE_DIR.glob("*.json"))
    assert tables, "no table shipped"
    for path in tables:
        data = json.loads(path.read_text())
        assert gemv_table.table_path(data["device"]) == path
        for e in data["entries"]:
            key = e["key"]
            if e["kernel"] == "dense_gemv":
                allowed = dense_candidates(key["N"], key["K"])
            else:
                m = key.get("M_KEY", 4)
                allowed = candidates(key["N"], key["K"], key["GROUP"], key["INT8"], m)
                assert e["kernel"] == "mma_gemv" or m == 4
            assert e["config"] in allowed, (path.name, e)


def test_tuning_covers_every_projection_of_a_decode_step():
    """`kernels.tune_gpu` tunes the shapes a decode step multiplies: fused qkv (with the
    GQA heads), o, fused gate/up, down and the LM head, each with the input step the dense
    GEMV fuses (1: the norm, 2: the SwiGLU), for the default model and the 8B shape."""
    from kernels.tune_gpu import projections
    from server.benchmarks.gpu_decode import llama3_8b
    from server.models.config import config_from_hf
    from server.models.loader import open_checkpoint

    assert projections(open_checkpoint(None).config) == {
        "qkv": ((9 + 2 * 3) * 64, 576, 1), "o": (576, 576, 0), "gate_up": (2 * 1536, 576, 1),
        "down": (576, 1536, 2), "lm_head": (49152, 576, 0)}
    assert projections(config_from_hf(llama3_8b().to_dict())) == {
        "qkv": (6144, 4096, 1), "o": (4096, 4096, 0), "gate_up": (28672, 4096, 1),
        "down": (4096, 14336, 2), "lm_head": (128256, 4096, 0)}
