"""The native CPU paged attention (kernels/cpu_attention.c through
`kernels.cpu_attention.paged_attention`) against `paged_attention_reference`: within 3e-6
relative Frobenius error in float32 (measured 2e-7 to 8e-7: the kernel's exponential is a
polynomial good to ~2 ulp); a row's bits independent of the batch, of the number of queries
beside it (verification against decode) and of the variant; keys outside a window never
read; a bad block table refused with nothing written; 16-bit caches read as the float32
values they hold. Outputs are poisoned with NaN beforehand so any unwritten element
fails."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_attention, cpu_native
from kernels.attention import paged_attention_reference
from tests.paged import random_paged_batch

pytestmark = pytest.mark.skipif(not cpu_native.available(),
                                reason="the native CPU kernels cannot run here")
TOL = 3e-6

CASES = [  # seq_lens, q_lens, heads, kv_heads, dim, block_size, window, sinks
    ([37, 5, 130], [1, 1, 1], 4, 4, 32, 16, None, 0),  # decode, MHA, tails of 5 and 2 keys
    ([37, 70, 130, 16], [5, 1, 4, 16], 9, 3, 64, 16, None, 0),  # verification, GQA 3
    ([1, 8, 9, 17, 33], [1, 8, 2, 16, 3], 2, 1, 128, 4, None, 0),  # dim 128; key counts
    ([100, 200, 41], [3, 5, 1], 8, 2, 48, 8, 48, 4),  # window + sinks; dim 48 (generic)
    ([90, 33], [16, 12], 4, 1, 16, 32, 16, 0),  # window only, every query its own
    ([300], [9], 6, 2, 64, 16, 1000, 4),  # a window longer than the context
    ([60, 45], [7, 1], 32, 1, 16, 16, None, 0),  # group 32: two tasks of 16 heads
    ([60, 45], [3, 2], 24, 2, 16, 16, 20, 2),  # group 12 (one position a call), window
    ([700, 257, 520], [1, 1, 16], 9, 3, 64, 16, None, 0),  # spans of 256 keys, merged
    ([900, 600], [5, 1], 8, 2, 48, 8, 600, 4),  # a window of 3 spans, and sinks
    ([1100], [3], 4, 1, 128, 16, 512, 0),  # window only, 2 spans
    # prefill chunks (`batch_builder.NATIVE_PREFILL_KEYS`): a whole prompt and a later chunk
    # beside a decode row; a chunk longer than its window, with sinks
    ([120, 300, 41], [120, 100, 1], 9, 3, 64, 16, None, 0),
    ([500], [200], 8, 2, 64, 16, 64, 4),
    ([1024, 5], [512, 1], 9, 3, 64, 16, None, 0),
]


def _native(q, k_cache, v_cache, tables, lens, qsl, scale, window, sinks, seqs=None, lib=None):
    out = torch.full_like(q, float("nan"))
    step = cpu_attention.attention_step(tables, lens, qsl, list(range(len(lens))) if seqs is None
                                        else seqs, window, sinks)
    assert cpu_attention.paged_attention(q, k_cache, v_cache, step, scale, out, lib)
    return out


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, native_lib):
    seq_lens, q_lens, heads, kv_heads, dim, block_size, window, sinks = case
    batch = random_paged_batch(seq_lens, q_lens, heads, kv_heads, dim, block_size, torch.float32)
    scale = dim ** -0.5 * 4  # scores spread over tens: the exponential's range is exercised
    out = _native(*batch, scale, window, sinks, lib=native_lib)
    ref = paged_attention_reference(*batch, scale, window, sinks)
    assert not torch.isnan(out).any()
    err = float((out - ref).norm() / ref.norm())
    assert err < TOL, err


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[8], CASES[12]])
def test_soft_capped_scores_match_reference(case, native_lib):
    """Gemma 2's soft-capping (cap * tanh(score / cap)) at a cap the scores reach (they
    spread over tens here), through decode, verification, merged spans, a window and a
    prefill chunk."""
    seq_lens, q_lens, heads, kv_heads, dim, block_size, window, sinks = case
    batch = random_paged_batch(seq_lens, q_lens, heads, kv_heads, dim, block_size, torch.float32)
    scale = dim ** -0.5 * 4
    step = cpu_attention.attention_step(*batch[3:], list(range(len(seq_lens))), window, sinks)
    out = torch.full_like(batch[0], float("nan"))
    assert cpu_attention.paged_attention(*batch[:3], step, scale, out, native_lib, softcap=5.0)
    ref = paged_attention_reference(*batch, scale, window, sinks, softcap=5.0)
    uncapped = paged_attention_reference(*batch, scale, window, sinks)
    err = float((out - ref).norm() / ref.norm())
    assert err < TOL, err
    assert float((uncapped - ref).norm() / ref.norm()) > 100 * TOL  # (the cap changes it)


def test_listed_sequences_only(native_lib):
    """Rows of sequences not listed stay as they were (the caller fills them by torch)."""
    q, k, v, tables, lens, qsl = random_paged_batch([20, 40, 60], [2, 3, 1], 4, 2, 32, 16,
                                                    torch.float32)
    out = _native(q, k, v, tables, lens, qsl, 0.2, None, 0, seqs=[2, 0], lib=native_lib)
    assert torch.isnan(out[2:5]).all() and not torch.isnan(out[:2]).any()
    assert not torch.isnan(out[5:]).any()


@pytest.mark.parametrize("window,sinks,lens", [
    (None, 0, [50, 77, 23, 100]), (48, 4, [50, 77, 23, 100]),
    (None, 0, [520, 300, 23, 530]), (400, 4, [520, 300, 23, 530])])
def test_a_row_depends_on_nothing_beside_it(window, sinks, lens, native_lib):
    """Bit for bit: a sequence alone as in a batch, and each of a verification step's
    queries as the decode step at its position (the keys after it unseen) gives it, so that
    speculation and batching leave greedy outputs exactly as they were. Without a window
    the queries of a step are attended together (16 at a time: 20 queries are 16 + 4).
    Past 256 keys a row's keys are attended in spans merged afterwards; the last two cases
    have verification steps whose queries end on both sides of a span's end (512)."""
    q, k, v, tables, lens, qsl = random_paged_batch(lens, [5, 1, 3, 20], 9, 3, 64, 16,
                                                    torch.float32)
    out = _native(q, k, v, tables, lens, qsl, 0.125, window, sinks, lib=native_lib)
    for i in range(4):
        a, b = int(qsl[i]), int(qsl[i + 1])
        for j in range(a, b):  # query j as the only query of a context ending at it
            length = int(lens[i]) - (b - 1 - j)
            alone = _native(q[j:j + 1].clone(), k, v, tables[i:i + 1].clone(),
                            torch.tensor([length], dtype=torch.int32),
                            torch.tensor([0, 1], dtype=torch.int32), 0.125, window, sinks,
                            lib=native_lib)
            assert torch.equal(alone[0], out[j]), (i, j)


@pytest.mark.parametrize("window,sinks", [(None, 0), (48, 4)])
def test_a_head_depends_on_nothing_beside_it(window, sinks, native_lib):
    """Bit for bit: the heads of a KV head's group, attended together (they share each
    block of keys while it is in cache), as each head alone with its KV head."""
    q, k, v, tables, lens, qsl = random_paged_batch([50, 77, 100], [5, 1, 20], 9, 3, 64, 16,
                                                    torch.float32)
    out = _native(q, k, v, tables, lens, qsl, 0.125, window, sinks, lib=native_lib)
    for g in range(3):  # heads g, 3 + g, 6 + g: one of each group, a group of one each
        heads = [g, 3 + g, 6 + g]
        alone = _native(q[:, heads].contiguous(), k, v, tables, lens, qsl, 0.125, window, sinks,
                        lib=native_lib)
        assert torch.equal(alone, out[:, heads]), g


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3]])
def test_16_bit_caches_read_as_the_float32_values_they_hold(case, dtype, native_lib):
    """A float16 or bfloat16 cache gives the bits of a float32 cache holding its values
    (every 16-bit value is one float32 exactly): decode and verification, dims 64, 128 and
    a generic one, a window with sinks."""
    seq_lens, q_lens, heads, kv_heads, dim, block_size, window, sinks = case
    q, k, v, *rest = random_paged_batch(seq_lens, q_lens, heads, kv_heads, dim, block_size,
                                        torch.float32)
    k16, v16 = k.to(dtype), v.to(dtype)
    out = _native(q, k16, v16, *rest, 0.3, window, sinks, lib=native_lib)
    assert torch.equal(out, _native(q, k16.float(), v16.float(), *rest, 0.3, window, sinks,
                                    lib=native_lib))


def test_the_variants_agree_bit_for_bit():
    libs = [cpu_native.load(v) for v in cpu_native.runnable()]
    if len(libs) < 2:
        pytest.skip("one variant runs here")
    batch = random_paged_batch([37, 70, 130, 600], [5, 1, 9, 3], 9, 3, 64, 16, torch.float32)
    for window in (64, None):  # (without one, the 600 keys are 3 spans merged)
        first = _native(*batch, 0.125, window, 4, lib=libs[0])
        assert all(torch.equal(_native(*batch, 0.125, window, 4, lib=lib), first)
                   for lib in libs[1:])


def test_keys_outside_the_window_are_never_read(native_lib):
    """NaN in every key and value no query sees, and in the table entries of blocks none
    reads (a hybrid pool's holes): the result is still the clean cache's."""
    window, sinks, block = 16, 4, 4
    q, k, v, tables, lens, qsl = random_paged_batch([70], [3], 4, 2, 32, block, torch.float32)
    ref = paged_attention_reference(q, k, v, tables, lens, qsl, 0.2, window, sinks)
    first_seen = 70 - 3 - window + 1
    for t in range(sinks, first_seen):
        slot = int(tables[0, t // block]) * block + t % block
        k.view(-1, 2, 32)[slot] = float("nan")
        v.view(-1, 2, 32)[slot] = float("nan")
    tables[0, 2:first_seen // block] = -7
    out = _native(q, k, v, tables, lens, qsl, 0.2, window, sinks, lib=native_lib)
    assert float((out - ref).norm() / ref.norm()) < TOL


def test_bad_tables_raise_and_write_nothing(native_lib):
    q, k, v, tables, lens, qsl = random_paged_batch([40, 20], [1, 1], 4, 2, 32, 16,
                                                    torch.float32)
    tables[1, 0] = k.shape[0]
    step = cpu_attention.attention_step(tables, lens, qsl, [0, 1], None, 0)
    out = torch.full_like(q, float("nan"))
    with pytest.raises(IndexError, match="outside the KV cache"):
        cpu_attention.paged_attention(q, k, v, step, 0.2, out, native_lib)
    assert torch.isnan(out).all()
    with pytest.raises(ValueError, match="listed sequences among them"):
        cpu_attention.attention_step(tables, lens, qsl, [2], None, 0)
    with pytest.raises(ValueError, match="a length per sequence"):
        cpu_attention.attention_step(tables[:1], lens, qsl, [0], None, 0)
    with pytest.raises(ValueError, match="at most that many queries"):
        cpu_attention.attention_step(tables, lens, torch.tensor([0, 1, 30], dtype=torch.int32),
                                     [0], None, 0)
    tables[1, 0] = 0
    with pytest.raises(ValueError, match="q has 1"):
        cpu_attention.paged_attention(q[:1], k, v, cpu_attention.attention_step(
            tables, lens, qsl, [0, 1], None, 0), 0.2, out[:1], native_lib)
    assert torch.isnan(out).all()


def test_declines_what_it_cannot_take():
    q, k, v, tables, lens, qsl = random_paged_batch([40], [2], 4, 2, 32, 16, torch.float32)
    step = cpu_attention.attention_step(tables.long(), lens, qsl, [0], None, 0)  # made int32

    def takes(q=q, k=k, v=v) -> bool:
        out = torch.empty(q.shape, dtype=q.dtype)
        return cpu_attention.paged_attention(q, k, v, step, 0.2, out)

    assert takes()
    assert not takes(q=q.bfloat16())
    assert not takes(k=k.double(), v=v.double())
    assert not takes(k=k.half(), v=v.bfloat16())  # one type for both caches
    assert not takes(q=q[..., :24].contiguous(), k=k[..., :24].contiguous(),
                     v=v[..., :24].contiguous())  # dim not a multiple of 16
    assert not takes(q=q.transpose(0, 1).contiguous().transpose(0, 1))
    assert not takes(k=k[:, :, :1].contiguous(), v=v[:, :, :1].contiguous().repeat(1, 1, 2, 1))
    with cpu_native.turned_off():
        assert not takes()
        assert cpu_attention.attention_step(tables, lens, qsl, [0], None, 0) is None


def test_the_engine_path_and_its_benchmark(tmp_path):
    """A decode step's metadata offers its short sequences to the kernel, and the engine's
    attention call gives the padded torch path's result; `leapfrog bench attention` times
    both sides (the torch side really without the kernel) and puts the kernel back."""
    import json

    from server.benchmarks import attention as bench
    from server.cli import main
    from server.engine.batch_builder import batch_meta
    from server.models.batch import attention

    k, v = torch.randn(8, 16, 3, 64), torch.randn(8, 16, 3, 64)
    q = torch.randn(3, 9, 64)
    meta = batch_meta([[[0, 1], [2, 3, 4], [5]]], [20, 40, 7], [21, 41, 8], [0, 1, 2, 3], 16,
                      torch.device("cpu"), True)
    assert meta.groups[0].native is not None
    with bench._torch_attention():
        torch_meta = batch_meta([[[0, 1], [2, 3, 4], [5]]], [20, 40, 7], [21, 41, 8],
                                [0, 1, 2, 3], 16, torch.device("cpu"), True)
    assert torch_meta.groups[0].native is None
    native, padded = (attention(q, None, None, k, v, m, 0.125) for m in (meta, torch_meta))
    assert float((native - padded).norm() / padded.norm()) < TOL
    out = tmp_path / "attention.json"
    assert main(["bench", "attention", "--batch-sizes", "2", "--contexts", "40", "--queries",
                 "1,3", "--repeats", "1", "--no-decode", "--result-json", str(out)]) == 0
    calls = json.loads(out.read_text())["calls"]
    assert [(c["batch"], c["context"], c["queries"]) for c in calls] == [(2, 40, 1), (2, 40, 3)]
    assert all(c["native_us"] > 0 and c["torch_us"] > 0 for c in calls)
    restored = cpu_attention.attention_step(*meta.groups[0].native.tensors[:3], [0], None, 0)
    assert restored is not None  # the benchmark put the kernel back
