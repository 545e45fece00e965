"""Paged KV cache bookkeeping: fixed-size blocks, free lists, refcounts, layer groups.

Pure Python (no tensors): the model runner owns the cache tensors; this module only decides
which physical blocks each request's logical blocks map to.

A cache is one pool of blocks per group of layers that share an attention policy
(`BlockManager`): the full-attention layers' pool, and in a hybrid cache a second pool for
the sink + sliding-window layers (`SinkWindow`), whose block tables keep only the blocks
that a query can still see (`BlockPool.slide`) and return the rest to their pool.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


class OutOfBlocksError(RuntimeError):
    """Raised by `allocate` when the pool cannot satisfy a request (nothing is changed)."""


@dataclass(frozen=True)
class SinkWindow:
    """The attention of sink + sliding-window layers: a query at position s sees the keys at
    positions t <= s with t > s - window (the window) or t < num_sinks (the sinks)."""

    window: int
    """Most recent positions a query sees, its own included."""
    num_sinks: int = 0
    """First positions every query sees."""

    def __post_init__(self) -> None:
        if self.window < 1 or self.num_sinks < 0:
            raise ValueError(f"need window >= 1 and num_sinks >= 0, got {self.window}, {self.num_sinks}")

    def most_blocks(self, step_tokens: int, block_size: int) -> int:
        """Most blocks a request holds at once when a step computes at most `step_tokens`
        of its tokens: the sinks' blocks, and the blocks from the first position the
        step's first query sees to its last query's."""
        return -(-self.num_sinks // block_size) + (self.window + step_tokens - 2) // block_size + 2

    def pool_blocks(self, num_seqs: int, step_tokens: int, block_size: int) -> int:
        """Most blocks `num_seqs` requests hold at once when a step computes at most
        `step_tokens` tokens of them all (and a step launched ahead one more of each):
        with m_i tokens each, the sum of `most_blocks(m_i)` is at most this, since
        (w + m - 2) // bs <= (w - 1) // bs + (m - 1) // bs + 1."""
        return num_seqs * (self.most_blocks(1, block_size) + 1) + step_tokens // block_size


def window_kwargs(window: SinkWindow | None) -> dict[str, int | None]:
    """`BatchMeta`'s sliding_window and num_sink_tokens for layers attending with `window`."""
    if window is None:
        return {"sliding_window": None, "num_sink_tokens": 0}
    return {"sliding_window": window.window, "num_sink_tokens": window.num_sinks}


class BlockPool:
    """Free list + refcounts over `num_blocks` blocks of `block_size` tokens, for the layers
    of one attention policy (`window` None: full attention).

    A block table entry of `hole` (= `num_blocks`: the scratch block the runner's caches
    hold past the pool) marks a logical block released because no query can see it any
    more (`slide`); holes lie between the sink blocks and the window and hold no block.

    Invariants (`check_integrity`): every block is either free (refcount 0, in the free list
    exactly once) or used (refcount >= 1, not in the free list); used refcounts equal the
    number of block tables that hold the block.
    """

    def __init__(self, num_blocks: int, block_size: int, window: SinkWindow | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.window = window
        self.hole = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refcount = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        # logical blocks before this index are sinks or holes (`slide`), by owner
        self._slid: dict[str, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, owner: str) -> list[int]:
        """The owner's physical blocks in logical order (empty if it holds none)."""
        return self._tables.get(owner, [])

    def extra_blocks(self, owner: str, num_tokens: int) -> int:
        """Blocks that `allocate(owner, num_tokens)` would take from the free list."""
        return max(0, self.blocks_needed(num_tokens) - len(self._tables.get(owner, ())))

    def can_allocate(self, owner: str, num_tokens: int) -> bool:
        return self.extra_blocks(owner, num_tokens) <= len(self._free)

    def allocate(self, owner: str, num_tokens: int) -> None:
        """Grow the owner's table so it covers `num_tokens` token slots."""
        table = self._tables.setdefault(owner, [])
        extra = self.blocks_needed(num_tokens) - len(table)
        if extra > len(self._free):
            if not table:
                del self._tables[owner]
            raise OutOfBlocksError(f"need {extra} blocks, {len(self._free)} free")
        for _ in range(extra):
            block = self._free.popleft()
            self._refcount[block] = 1
            table.append(block)

    def truncate(self, owner: str, num_tokens: int) -> None:
        """Release the owner's blocks past the first `num_tokens` slots (speculative
        rollback: never into the holes, which lie before every position computed again)."""
        table = self._tables.get(owner)
        if table is None:
            return
        keep = self.blocks_needed(num_tokens)
        while len(table) > keep:
            self._release(table.pop())

    def slide(self, owner: str, num_computed_tokens: int) -> None:
        """With a window: release the owner's blocks that no query from position
        `num_computed_tokens` on can see (all their positions before the window's start,
        none a sink), leaving holes."""
        table = self._tables.get(owner)
        if self.window is None or not table:
            return
        sinks = -(-self.window.num_sinks // self.block_size)
        # the first position a query at num_computed_tokens or later can see in the window
        end = min(max(0, num_computed_tokens - self.window.window + 1) // self.block_size, len(table))
        for j in range(max(sinks, self._slid.get(owner, 0)), end):
            self._release(table[j])
            table[j] = self.hole
        if end > sinks:
            self._slid[owner] = end

    def free(self, owner: str) -> None:
        """Release every block the owner holds (finish, abort, preemption)."""
        self._slid.pop(owner, None)
        for block in reversed(self._tables.pop(owner, [])):
            if block != self.hole:
                self._release(block)

    def _release(self, block: int) -> None:
        self._refcount[block] -= 1
        if self._refcount[block] == 0:
            self._free.append(block)

    def check_integrity(self) -> None:
        """Assert the invariants above; raises AssertionError with the first violation."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is in the free list twice"
        held = [0] * self.num_blocks
        for owner, table in self._tables.items():
            for j, block in enumerate(table):
                if block == self.hole:
                    assert j < self._slid.get(owner, 0), f"{owner}: a hole after the window's start"
                    continue
                held[block] += 1
        for block in range(self.num_blocks):
            if block in free:
                assert self._refcount[block] == 0 and held[block] == 0, f"free block {block} is in use"
            else:
                assert self._refcount[block] == held[block] >= 1, (
                    f"block {block}: refcount {self._refcount[block]}, held by {held[block]} tables"
                )


class BlockManager:
    """The block tables of every layer group, grown, rolled back and freed together.

    `pools[0]` holds the full-attention layers' blocks (a window pool when no layer attends
    to the whole context: then `num_blocks` is 0 and only `window_pool` is given); a hybrid
    cache adds `window_pool` for the sink + window layers. `num_blocks`,
    `num_free_blocks` and `block_table` describe `pools[0]`, whose size bounds a request's
    context.
    """

    def __init__(self, num_blocks: int, block_size: int, window_pool: BlockPool | None = None) -> None:
        if window_pool is not None and (window_pool.window is None or window_pool.block_size != block_size):
            raise ValueError("window_pool needs a window and the same block size")
        self.pools = ([BlockPool(num_blocks, block_size)] if num_blocks or window_pool is None
                      else []) + ([window_pool] if window_pool is not None else [])
        self.block_size = block_size

    @property
    def num_blocks(self) -> int:
        return self.pools[0].num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pools[0].num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (0..1) in the fullest pool."""
        return max(p.usage for p in self.pools)

    def block_table(self, owner: str) -> list[int]:
        """The owner's blocks in `pools[0]` (empty if it holds none)."""
        return self.pools[0].block_table(owner)

    def block_tables(self, owner: str) -> list[list[int]]:
        """The owner's blocks in each pool, in pool order."""
        return [p.block_table(owner) for p in self.pools]

    def fits(self, num_tokens: int) -> bool:
        """Whether a request of `num_tokens` tokens fits the cache alone (a window pool's
        share: its sinks, window and one block)."""
        for p in self.pools:
            n = num_tokens if p.window is None else min(
                num_tokens, p.window.num_sinks + p.window.window + self.block_size)
            if p.blocks_needed(n) > p.num_blocks:
                return False
        return True

    def can_allocate(self, owner: str, num_tokens: int) -> bool:
        return all(p.can_allocate(owner, num_tokens) for p in self.pools)

    def can_allocate_all(self, wants: list[tuple[str, int]]) -> bool:
        """Whether every (owner, num_tokens) can be allocated together."""
        return all(sum(p.extra_blocks(owner, n) for owner, n in wants) <= p.num_free_blocks
                   for p in self.pools)

    def allocate(self, owner: str, num_tokens: int) -> None:
        """Grow the owner's tables so they cover `num_tokens` token slots; on
        OutOfBlocksError nothing is changed."""
        for p in self.pools:
            if not p.can_allocate(owner, num_tokens):
                p.allocate(owner, num_tokens)  # raises with the pool's numbers
        for p in self.pools:
            p.allocate(owner, num_tokens)

    def truncate(self, owner: str, num_tokens: int) -> None:
        """Release the owner's blocks past the first `num_tokens` slots (speculative rollback)."""
        for p in self.pools:
            p.truncate(owner, num_tokens)

    def slide(self, owner: str, num_computed_tokens: int) -> None:
        """Release the window pools' blocks that no later query can see (`BlockPool.slide`)."""
        for p in self.pools:
            p.slide(owner, num_computed_tokens)

    def free(self, owner: str) -> None:
        """Release every block the owner holds (finish, abort, preemption)."""
        for p in self.pools:
            p.free(owner)

    def check_integrity(self) -> None:
        """Assert every pool's invariants (`BlockPool.check_integrity`)."""
        for p in self.pools:
            p.check_integrity()
