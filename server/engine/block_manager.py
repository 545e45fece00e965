"""Paged KV cache bookkeeping: fixed-size blocks, free lists, refcounts, layer groups.

Pure Python (no tensors): the model runner owns the cache tensors; this module only decides
which physical blocks each request's logical blocks map to.

A cache is one pool of blocks per group of layers that share an attention policy
(`BlockManager`): the full-attention layers' pool, and in a hybrid cache a second pool for
the sink + sliding-window layers (`SinkWindow`), whose block tables keep only the blocks
that a query can still see (`BlockPool.slide`) and return the rest to their pool.

With prefix caching, a full-attention pool keeps the blocks of fully computed token blocks
under a hash of all the tokens up to their end (`BlockPool.commit`); freed, they stay in
the free list, oldest first, until they are handed out again, and a new request whose
tokens begin the same way takes them instead of computing them (`BlockPool.reuse_prefix`).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
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


def block_slots(table: list[int], positions: Iterable[int], block_size: int) -> list[int]:
    """The KV cache slots of a sequence's positions, through its block table."""
    return [table[p // block_size] * block_size + p % block_size for p in positions]


class BlockPool:
    """Free list + refcounts over `num_blocks` blocks of `block_size` tokens, for the layers
    of one attention policy (`window` None: full attention).

    A block table entry of `hole` (= `num_blocks`: the scratch block the runner's caches
    hold past the pool) marks a logical block released because no query can see it any
    more (`slide`); holes lie between the sink blocks and the window and hold no block.

    With `cache_prefixes`, blocks of computed tokens are also cached (`commit`), free or
    not, until the free list hands them out again; `reuse_prefix` shares them.

    Invariants (`check_integrity`): every block is either free (refcount 0, in the free list
    exactly once) or used (refcount >= 1, not in the free list); used refcounts equal the
    number of block tables that hold the block; the cache's two maps agree.
    """

    def __init__(self, num_blocks: int, block_size: int, window: SinkWindow | None = None,
                 cache_prefixes: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        if cache_prefixes and window is not None:
            raise ValueError("prefix caching needs full attention")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.window = window
        self.cache_prefixes = cache_prefixes
        self.hole = num_blocks
        # free blocks, the longest free first (insertion order; O(1) removal of a cached
        # block that a request takes back)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refcount = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        # logical blocks before this index are sinks or holes (`slide`), by owner
        self._slid: dict[str, int] = {}
        # prefix caching: the block holding the tokens whose hash chain ends in a hash,
        # each such block's hash, and by owner the hashes of its first (computed) blocks
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._hashes: dict[str, list[bytes]] = {}

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
            block = self._free.popitem(last=False)[0]
            cached = self._hash_of.pop(block, None)
            if cached is not None:  # handed out again: no longer a cached prefix
                del self._by_hash[cached]
            self._refcount[block] = 1
            table.append(block)

    def reuse_prefix(self, owner: str, token_ids: list[int]) -> int:
        """With prefix caching, for an owner that holds no blocks: take the cached blocks
        of the longest run of `token_ids`' first full blocks (leaving at least its last
        token to compute, so no step writes into a shared block). Returns the tokens
        they hold (0 without caching or a hit)."""
        if not self.cache_prefixes or owner in self._tables:
            return 0
        hashes: list[bytes] = []
        table: list[int] = []
        bs = self.block_size
        for j in range((len(token_ids) - 1) // bs):
            h = _chain(hashes[-1] if hashes else b"", token_ids[j * bs:(j + 1) * bs])
            block = self._by_hash.get(h)
            if block is None:
                break
            if self._refcount[block] == 0:
                del self._free[block]
            self._refcount[block] += 1
            hashes.append(h)
            table.append(block)
        if table:
            self._tables[owner], self._hashes[owner] = table, hashes
        return len(table) * bs

    def commit(self, owner: str, num_computed_tokens: int,
               token_ids: Callable[[], list[int]]) -> None:
        """With prefix caching: cache the owner's blocks that the first
        `num_computed_tokens` fill (`token_ids()`: its tokens, asked for only when a block
        is newly full). A prefix cached in another block already keeps that block."""
        table = self._tables.get(owner)
        if not self.cache_prefixes or not table:
            return
        hashes = self._hashes.setdefault(owner, [])
        full = min(num_computed_tokens // self.block_size, len(table))
        if full <= len(hashes):
            return
        tokens, bs = token_ids(), self.block_size
        for j in range(len(hashes), full):
            h = _chain(hashes[-1] if hashes else b"", tokens[j * bs:(j + 1) * bs])
            hashes.append(h)
            if h not in self._by_hash and table[j] not in self._hash_of:
                self._by_hash[h], self._hash_of[table[j]] = table[j], h

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
        """Release every block the owner holds (finish, abort, preemption); cached ones
        stay cached until handed out again, the last of a table first."""
        self._slid.pop(owner, None)
        self._hashes.pop(owner, None)
        for block in reversed(self._tables.pop(owner, [])):
            if block != self.hole:
                self._release(block)

    def _release(self, block: int) -> None:
        self._refcount[block] -= 1
        if self._refcount[block] == 0:
            self._free[block] = None

    def check_integrity(self) -> None:
        """Assert the invariants above; raises AssertionError with the first violation."""
        free = set(self._free)
        assert all(self._hash_of.get(b) == h for h, b in self._by_hash.items()), "hash maps disagree"
        assert len(self._by_hash) == len(self._hash_of), "hash maps disagree"
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


def _chain(previous: bytes, tokens: list[int]) -> bytes:
    """The hash of a block's tokens after the blocks whose chain ends in `previous`: a
    cryptographic one, so that no prompt can be made to collide with another's prefix."""
    return hashlib.blake2b(previous + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    """The block tables of every layer group, grown, rolled back and freed together.

    `pools[0]` holds the full-attention layers' blocks (a window pool when no layer attends
    to the whole context: then `num_blocks` is 0 and only `window_pool` is given); a hybrid
    cache adds `window_pool` for the sink + window layers. `num_blocks`,
    `num_free_blocks` and `block_table` describe `pools[0]`, whose size bounds a request's
    context.
    """

    def __init__(self, num_blocks: int, block_size: int, window_pool: BlockPool | None = None,
                 cache_prefixes: bool = False) -> None:
        """`cache_prefixes`: prefix caching, for a cache of full attention only."""
        if window_pool is not None and (window_pool.window is None or window_pool.block_size != block_size):
            raise ValueError("window_pool needs a window and the same block size")
        if cache_prefixes and window_pool is not None:
            raise ValueError("prefix caching does not serve sink + window layers")
        self.pools = ([BlockPool(num_blocks, block_size, cache_prefixes=cache_prefixes)]
                      if num_blocks or window_pool is None else []
                      ) + ([window_pool] if window_pool is not None else [])
        self.block_size = block_size
        # the lone pool, whose calls skip the loops over pools (the scheduler makes some for
        # every request of every step)
        self._only = self.pools[0] if len(self.pools) == 1 else None

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
        if self._only is not None:
            return self._only.can_allocate(owner, num_tokens)
        return all(p.can_allocate(owner, num_tokens) for p in self.pools)

    def can_allocate_all(self, wants: list[tuple[str, int]]) -> bool:
        """Whether every (owner, num_tokens) can be allocated together."""
        return all(sum(p.extra_blocks(owner, n) for owner, n in wants) <= p.num_free_blocks
                   for p in self.pools)

    def allocate(self, owner: str, num_tokens: int) -> None:
        """Grow the owner's tables so they cover `num_tokens` token slots; on
        OutOfBlocksError nothing is changed."""
        if self._only is not None:
            self._only.allocate(owner, num_tokens)
            return
        for p in self.pools:
            if not p.can_allocate(owner, num_tokens):
                p.allocate(owner, num_tokens)  # raises with the pool's numbers
        for p in self.pools:
            p.allocate(owner, num_tokens)

    def truncate(self, owner: str, num_tokens: int) -> None:
        """Release the owner's blocks past the first `num_tokens` slots (speculative rollback)."""
        for p in self.pools:
            p.truncate(owner, num_tokens)

    def reuse_prefix(self, owner: str, token_ids: list[int]) -> int:
        """Cached tokens an owner that holds no blocks takes (`BlockPool.reuse_prefix`)."""
        return self.pools[0].reuse_prefix(owner, token_ids)

    def commit(self, owner: str, num_computed_tokens: int,
               token_ids: Callable[[], list[int]]) -> None:
        """Cache the owner's newly filled blocks (`BlockPool.commit`)."""
        self.pools[0].commit(owner, num_computed_tokens, token_ids)

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
