"""Decode steps of a random 4-layer model (hidden 2048) on CUDA, graphed and eager, through
`server.benchmarks.gpu_steps`: the launch-level mechanisms of a step (programmatic
dependent launch, GEMVs handing their sums to the next kernel) against the plain launches
they replace."""

from __future__ import annotations

import pytest
import torch

from server.benchmarks.gpu_steps import decode_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model(scheme: str | None) -> torch.nn.Module:
    """The random model, its projections packed to `scheme` (None: bfloat16)."""
    from transformers import LlamaConfig

    from kernels.quant import to_words
    from server.benchmarks.gpu_decode import build_models
    from server.models.quantize import linear_modules, quantize_dense

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                         num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    _, model = build_models(config)
    if scheme is not None:
        for _, lin in linear_modules(model):
            lin.packed = to_words(quantize_dense(lin.weight, scheme))
    return model


@pytest.mark.parametrize("scheme", [None, "int4"])
def test_pdl_replay_matches_serialized_launches(scheme):
    """With programmatic dependent launch (`kernels.pdl`) each kernel starts during its
    predecessor's tail and loads weights before waiting for it. Decode steps replayed from
    CUDA graphs (batch 1: GEMVs with fused norms and the mma GEMV; batches 4, 8, 12 and 16:
    the mma GEMV at M = 4, 8, 12 and 16, int4 in groups of 16, 8 or 4 rows, and cuBLAS) must
    give bit-identical logits to the same kernels launched one after another: a read before
    the wait would see the previous step's activations."""
    from kernels import pdl

    if not pdl.use_pdl(torch.device("cuda")):
        pytest.skip("PDL needs sm_90+ and Triton 3.4+")
    model = _model(scheme)
    for batch in (1, 4, 8, 12, 16):
        overlapped = [logits.clone() for _, logits in decode_steps(model, batch, 300, 6, True)]
        with pdl.disabled():
            serial = [logits.clone() for _, logits in decode_steps(model, batch, 300, 6, True)]
        for step, (a, b) in enumerate(zip(overlapped, serial, strict=True)):
            assert torch.isfinite(a).all()
            assert torch.equal(a, b), (batch, step)


def test_gemv_sums_decode_matches_merged_gemvs():
    """int4 batch-1 decode with the packed GEMVs handing their sums to the next kernel
    (`kernels.triton_fused.GemvSums`): bit-identical logits on every run (integer adds in
    any order; a consumer reading sums before all programs added them, or zeroing them
    under another reader, gave different logits on every run, 0.3-1.4 off in relative norm:
    docs/benchmarks/gpu.md, run 65), close to those of GEMVs that merge their own split-K
    partials, and the sums buffer left zero. The two paths round differently (the fixed-point
    sum once at 2^-32, the float32 merge at every add), so some bfloat16 outputs differ by
    an ulp and the difference grows through the layers: 1.08e-2 in relative norm after 4
    layers and 4 steps (run 66), hence the bound of 5e-2. Each step's input is the greedy
    token of the step before in its own path, so the comparison stops after a step whose
    greedy tokens differ between the paths (a near-tie on these random weights: on an H100
    in session 42, step 2 then differed by 1.42 after steps 0-1 at 1.3e-2)."""
    from kernels.gemv_sums import _sums, sums_disabled

    model = _model("int4")
    for graphed in (True, False):
        runs = [[logits.clone() for _, logits in decode_steps(model, 1, 300, 4, graphed)]
                for _ in range(2)]
        assert int(_sums[torch.device("cuda", 0)].abs().sum()) == 0
        with sums_disabled():
            merged = [logits.clone() for _, logits in decode_steps(model, 1, 300, 4, graphed)]
        for step, (a, again) in enumerate(zip(*runs, strict=True)):
            assert torch.equal(a, again), (graphed, step)
        for step, (a, b) in enumerate(zip(runs[0], merged, strict=True)):
            rel = float((a.float() - b.float()).norm() / b.float().norm())
            print(f"graphed={graphed} step {step}: relative difference to merged {rel:.2e}")
            assert rel < 5e-2, (graphed, step)
            if not torch.equal(a.argmax(-1), b.argmax(-1)):
                break  # (a near-tie chosen either way: the next steps' inputs differ)
