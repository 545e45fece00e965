"""Paged KV cache bookkeeping: fixed-size blocks, a free list, refcounts.

Pure Python (no tensors): the model runner owns the cache tensors; this class only decides
which physical blocks each request's logical blocks map to.
"""

from __future__ import annotations

from collections import deque


class OutOfBlocksError(RuntimeError):
    """Raised by `allocate` when the pool cannot satisfy a request (nothing is changed)."""


class BlockManager:
    """Free list + refcounts over `num_blocks` blocks of `block_size` tokens.

    Invariants (`check_integrity`): every block is either free (refcount 0, in the free list
    exactly once) or used (refcount >= 1, not in the free list); used refcounts equal the
    number of block tables that hold the block.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refcount = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}

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

    def can_allocate(self, owner: str, num_tokens: int) -> bool:
        have = len(self._tables.get(owner, ()))
        return self.blocks_needed(num_tokens) - have <= len(self._free)

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
        """Release the owner's blocks past the first `num_tokens` slots (speculative rollback)."""
        table = self._tables.get(owner)
        if table is None:
            return
        keep = self.blocks_needed(num_tokens)
        while len(table) > keep:
            self._release(table.pop())

    def free(self, owner: str) -> None:
        """Release every block the owner holds (finish, abort, preemption)."""
        for block in reversed(self._tables.pop(owner, [])):
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
        for table in self._tables.values():
            for block in table:
                held[block] += 1
        for block in range(self.num_blocks):
            if block in free:
                assert self._refcount[block] == 0 and held[block] == 0, f"free block {block} is in use"
            else:
                assert self._refcount[block] == held[block] >= 1, (
                    f"block {block}: refcount {self._refcount[block]}, held by {held[block]} tables"
                )
