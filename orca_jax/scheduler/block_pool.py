"""The pool of KV cache blocks: integer ids in, integer ids out, with reference counts and a
cache of full blocks by content (prefix caching)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable

# Block 0 is never handed out: padding tokens write their K/V there, and unused block-table
# entries point at it, so every slot the device touches is a valid one.
NULL_BLOCK_ID = 0


class BlockPool:
    """Blocks `1 .. num_blocks - 1` (block 0 is the null block), each held by a count of
    requests.

    A block nobody holds is free. Free blocks are handed out least recently freed first
    (FIFO). A full block whose K/V is known can be registered under a key naming its
    content (`cache`); it stays findable (`lookup`) after its holders free it, until
    `allocate` hands it out again (eviction), so a later request with the same prefix takes
    it back (`hold`) instead of recomputing it. The pool knows nothing about requests;
    `KVCacheManager` keeps the per-request tables and computes the keys.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        # Free blocks in the order they will be handed out (an ordered set).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._ref_count = [0] * num_blocks
        self._key_of: dict[int, Hashable] = {}  # cached block -> its content key
        self._block_of: dict[Hashable, int] = {}  # content key -> cached block

    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can ever be allocated (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks ready to hand out (cached ones nobody holds included)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks currently held."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by content (held or not)."""
        return len(self._block_of)

    def ref_count(self, block_id: int) -> int:
        return self._ref_count[block_id]

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take `num_blocks` free blocks, or None (taking nothing) when too few are free.
        A cached block handed out is evicted from the cache first."""
        if num_blocks < 0:
            raise ValueError(f"cannot allocate {num_blocks} blocks")
        if num_blocks > len(self._free):
            return None
        block_ids = [self._free.popitem(last=False)[0] for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_count[block_id] = 1
            key = self._key_of.pop(block_id, None)
            if key is not None:
                del self._block_of[key]
        return block_ids

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one hold on each block; a block nobody holds any more becomes free (cached
        ones stay findable). Raises ValueError, changing nothing, on a bad or unheld id."""
        block_ids = list(block_ids)
        drops: dict[int, int] = {}
        for block_id in block_ids:
            if not 0 < block_id < self.num_blocks:
                raise ValueError(f"block id {block_id} is not an allocatable block")
            drops[block_id] = drops.get(block_id, 0) + 1
            if drops[block_id] > self._ref_count[block_id]:
                raise ValueError(f"double free of block {block_id}")
        for block_id in block_ids:
            self._ref_count[block_id] -= 1
            if self._ref_count[block_id] == 0:
                self._free[block_id] = None

    def cache(self, block_id: int, key: Hashable) -> None:
        """Register a held, full block under its content `key` (no-op if the key is taken:
        the first block with that content stays the one found)."""
        if self._ref_count[block_id] < 1:
            raise ValueError(f"block {block_id} is not held; only held blocks can be cached")
        if key in self._block_of or block_id in self._key_of:
            return
        self._block_of[key] = block_id
        self._key_of[block_id] = key

    def lookup(self, key: Hashable) -> int | None:
        """The cached block holding this content, or None."""
        return self._block_of.get(key)

    def hold(self, block_id: int) -> None:
        """Add a hold on a cached block (taking it off the free list if nobody held it)."""
        if block_id not in self._key_of:
            raise ValueError(f"block {block_id} is not cached")
        if self._ref_count[block_id] == 0:
            del self._free[block_id]
        self._ref_count[block_id] += 1
