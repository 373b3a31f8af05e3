"""Per-request block tables on top of the block pool."""

from __future__ import annotations

from orca_jax.scheduler.block_pool import BlockPool
from orca_jax.scheduler.request import Request


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


class KVCacheManager:
    """Maps each request to the ordered list of blocks holding its K/V.

    Token at position p of a request lives in block `block_ids[p // block_size]`, slot
    `p % block_size`. Two policies use it differently: `allocate_slots` grows a table as tokens
    arrive (paged), `reserve` takes the worst case at admission (orca, static).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.block_pool = BlockPool(num_blocks)
        # req_id -> its blocks in position order; a request absent here holds no block.
        self.req_to_block_ids: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds."""
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests."""
        return self.block_pool.usage

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return cdiv(num_tokens, self.block_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether `num_tokens` tokens fit in the whole cache when nothing else holds a block."""
        return self.num_blocks_for(num_tokens) <= self.block_pool.num_usable_blocks

    def get_block_ids(self, req_id: str) -> list[int]:
        """The request's block table (a copy; empty when it holds no block)."""
        return list(self.req_to_block_ids.get(req_id, ()))

    def allocate_slots(self, request: Request, num_new_tokens: int) -> list[int] | None:
        """Grow the table so `num_computed_tokens + num_new_tokens` tokens fit.

        Returns the newly added block ids (possibly none), or None when the pool lacks blocks,
        in which case nothing is allocated and the caller decides whom to preempt.
        """
        num_tokens = request.num_computed_tokens + num_new_tokens
        return self._grow(request.req_id, num_tokens)

    def reserve(self, request: Request, num_tokens: int) -> bool:
        """Allocate up front every block for `num_tokens` tokens; False (nothing taken) if short."""
        return self._grow(request.req_id, num_tokens) is not None

    def free(self, request: Request) -> None:
        """Return all of the request's blocks to the pool (no-op if it holds none)."""
        block_ids = self.req_to_block_ids.pop(request.req_id, None)
        if block_ids:
            self.block_pool.free(block_ids)

    def _grow(self, req_id: str, num_tokens: int) -> list[int] | None:
        block_ids = self.req_to_block_ids.get(req_id, [])
        num_missing = self.num_blocks_for(num_tokens) - len(block_ids)
        if num_missing <= 0:
            return []
        new_block_ids = self.block_pool.allocate(num_missing)
        if new_block_ids is None:
            return None
        self.req_to_block_ids[req_id] = block_ids + new_block_ids
        return new_block_ids
