"""`CudaGraphRunner`'s step inputs, filled on the host (runs on CPU: no graph is captured)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from server.engine.cuda_graphs import CudaGraphRunner

BS = 4  # block size
SCRATCH = 50  # the scratch block


def runner() -> CudaGraphRunner:
    cache = torch.zeros(SCRATCH + 1, BS, 1, 8)
    model = types.SimpleNamespace(kv_caches=[(cache, cache)])
    return CudaGraphRunner(model, BS, SCRATCH, max_model_len=40, max_batch=8, max_query_len=3)


def expected(b: int, q: int, starts: list[int], ids: list[list[int]],
             tables: list[list[int]]) -> dict[str, list]:
    """Each row's inputs, written out one token at a time."""
    rows: dict[str, list] = {"ids": [], "positions": [], "slots": [], "lens": []}
    for i in range(b):
        real = i < len(starts)
        for j in range(q):
            pos = starts[i] + j if real else j
            block = tables[i][pos // BS] if real else SCRATCH
            rows["ids"].append(ids[i][j] if real else 0)
            rows["positions"].append(pos)
            rows["slots"].append(block * BS + pos % BS)
        rows["lens"].append((starts[i] if real else 0) + q)
    rows["qsl"] = [i * q for i in range(b + 1)]
    return rows


@pytest.mark.parametrize(("b", "q", "n"), [(1, 1, 1), (4, 1, 3), (8, 3, 5), (2, 2, 0)])
def test_fill_writes_every_input(b: int, q: int, n: int) -> None:
    rng = np.random.default_rng(b * 10 + q)
    r = runner()
    r.dev.fill_(-7)  # poison: every value a step reads must be written
    r.host.fill_(-7)
    tables = [[int(x) for x in rng.permutation(SCRATCH)[: int(rng.integers(3, 10))]]
              for _ in range(n)]
    starts = [int(rng.integers(0, len(t) * BS - q + 1)) for t in tables]
    ids = [[int(x) for x in rng.integers(1, 1000, q)] for _ in range(n)]
    r._fill(b, q, starts, ids, tables)
    views = r._views(b, q)
    assert all((v.data_ptr() - r.dev.data_ptr()) % 16 == 0 for v in views)  # kernels' loads
    got_ids, pos, slots, bt, lens, qsl = views
    want = expected(b, q, starts, ids, tables)
    assert got_ids.tolist() == want["ids"]
    assert pos.tolist() == want["positions"]
    assert slots.tolist() == want["slots"]
    assert lens.tolist() == want["lens"]
    assert qsl.tolist() == want["qsl"]
    for i in range(b):  # the block entries a row's positions read
        need = -(-int(want["lens"][i]) // BS)
        row = tables[i] if i < n else [SCRATCH] * need
        assert bt[i, :need].tolist() == row[:need]


def test_fill_of_another_shape_keeps_each_graph_layout() -> None:
    """Graphs of different (B, Q) read different views of one buffer: a fill of one shape
    gives the same views as a fill of that shape alone, whatever was filled before."""
    r = runner()
    r._fill(8, 3, [0, 4], [[1, 2, 3], [4, 5, 6]], [[3, 4], [5, 6, 7]])
    r._fill(2, 1, [5], [[9]], [[10, 11, 12]])
    ids, pos, slots, bt, lens, qsl = r._views(2, 1)
    assert ids.tolist() == [9, 0]
    assert pos.tolist() == [5, 0]
    assert slots.tolist() == [11 * BS + 1, SCRATCH * BS]
    assert bt[0, :3].tolist() == [10, 11, 12] and bt[1, 0].item() == SCRATCH
    assert lens.tolist() == [6, 1]
    assert qsl.tolist() == [0, 1, 2]
