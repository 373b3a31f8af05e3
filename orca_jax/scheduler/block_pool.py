"""The pool of KV cache blocks: integer ids in, integer ids out."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

# Block 0 is never handed out: padding tokens write their K/V there, and unused block-table
# entries point at it, so every slot the device touches is a valid one.
NULL_BLOCK_ID = 0


class BlockPool:
    """Free list of KV cache block ids `1 .. num_blocks - 1` (block 0 is the null block).

    Blocks are handed out oldest-freed first (FIFO). The pool knows nothing about requests;
    `KVCacheManager` keeps the per-request tables.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))
        self._is_free = [False] + [True] * (num_blocks - 1)

    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can ever be allocated (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks ready to hand out."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks currently allocated."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take `num_blocks` free blocks, or None (taking nothing) when too few are free."""
        if num_blocks < 0:
            raise ValueError(f"cannot allocate {num_blocks} blocks")
        if num_blocks > len(self._free):
            return None
        block_ids = [self._free.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._is_free[block_id] = False
        return block_ids

    def free(self, block_ids: Iterable[int]) -> None:
        """Return blocks to the pool; raises ValueError (freeing none) on a bad or free id."""
        block_ids = list(block_ids)
        seen: set[int] = set()
        for block_id in block_ids:
            if not 0 < block_id < self.num_blocks:
                raise ValueError(f"block id {block_id} is not an allocatable block")
            if self._is_free[block_id] or block_id in seen:
                raise ValueError(f"double free of block {block_id}")
            seen.add(block_id)
        for block_id in block_ids:
            self._is_free[block_id] = True
            self._free.append(block_id)
