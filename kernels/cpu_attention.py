"""Paged attention of decode and verification steps on the CPU: `cpu_attention.c`'s
`lf_cpu_paged_attention` in the native library `kernels.cpu_native` loads. A step's
sequences are described once (`attention_step`) and every layer's call (`paged_attention`)
reads their keys and values straight from its paged cache."""

from __future__ import annotations

import ctypes

import torch

from kernels.cpu_native import Library, float_rows, kv_type, library_in_use


class AttentionStep(ctypes.Structure):
    """One step's sequences for `paged_attention`, shared by every layer (cpu_attention.c's
    struct lf_attention_step; `attention_step` builds it and keeps its tensors alive)."""

    _fields_ = [("tables", ctypes.c_void_p), ("max_blocks", ctypes.c_int64),
                ("seq_lens", ctypes.c_void_p), ("query_start", ctypes.c_void_p),
                ("seqs", ctypes.c_void_p), ("num_listed", ctypes.c_int64),
                ("window", ctypes.c_int64), ("sinks", ctypes.c_int64)]


def attention_step(block_tables: torch.Tensor, seq_lens: torch.Tensor,
                   query_start_loc: torch.Tensor, seqs: list[int], sliding_window: int | None,
                   num_sink_tokens: int) -> AttentionStep | None:
    """The step's sequences `seqs` (indices into the int32 tables, lengths and offsets of
    `kernels.attention`'s layout, in CPU memory) for `paged_attention`; None where the
    native kernels do not run."""
    if library_in_use() is None:
        return None
    tensors = tuple(t.to("cpu", torch.int32).contiguous() for t in (
        block_tables, seq_lens, query_start_loc, torch.tensor(seqs, dtype=torch.int32)))
    tables, lens, starts, listed = tensors
    q_lens = starts[1:] - starts[:-1] if starts.numel() == lens.numel() + 1 else None
    if not (tables.dim() == 2 and tables.shape[0] == lens.numel() and q_lens is not None
            and bool(((q_lens >= 0) & (q_lens <= lens)).all())
            and all(0 <= i < lens.numel() for i in seqs)):
        raise ValueError("attention_step: a block table row and a length per sequence, at "
                         "most that many queries each, and listed sequences among them")
    step = AttentionStep(tables.data_ptr(), tables.shape[1], lens.data_ptr(), starts.data_ptr(),
                         listed.data_ptr(), len(seqs), sliding_window or 0, num_sink_tokens)
    step.tensors = tensors
    step.rows = int(starts[-1])  # the queries' rows run up to here
    return step


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    step: AttentionStep, scale: float, out: torch.Tensor,
                    lib: Library | None = None, softcap: float | None = None) -> bool:
    """Attention of `step`'s sequences' queries into their rows of `out` ([T, heads, dim],
    as q), from one layer's paged caches (scores soft-capped at `softcap`, Gemma 2's, where
    given); a row's bits depend only on its own query and keys. False, with nothing written, where the native kernels do not take these tensors
    (float32 q and out and caches of a `cpu_native.KV_TYPES` type, in CPU memory,
    contiguous, dim a multiple of 16): the caller then uses torch's. Its cost grows with
    each query's keys, so it suits decode and verification steps and prefill chunks of short
    sequences: past ~1,000 keys a prefill chunk runs faster through torch's blocked
    attention (`server.engine.batch_builder.NATIVE_PREFILL_KEYS`)."""
    lib = lib or library_in_use()
    if lib is None:
        return False
    t, heads, dim = q.shape
    if t < step.rows:
        raise ValueError(f"the step's queries take {step.rows} rows, q has {t}")
    kv = kv_type(k_cache, v_cache, dim)
    if not (dim % 16 == 0 and float_rows(q, dim) and float_rows(out, dim)
            and out.shape == q.shape and k_cache.dim() == 4 and kv is not None
            and heads % k_cache.shape[2] == 0):
        return False
    rc = lib.attention(ctypes.addressof(step), q.data_ptr(), heads, k_cache.shape[2], dim,
                       k_cache.data_ptr(), v_cache.data_ptr(), kv, k_cache.shape[0],
                       k_cache.shape[1], scale, softcap or 0.0, out.data_ptr())
    if rc == -1:
        raise IndexError("a block table names a block outside the KV cache")
    if rc != 0:
        raise MemoryError("the native attention could not allocate its scratch memory")
    return True
