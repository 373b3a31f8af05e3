"""Per-request block tables on top of the block pool."""

from __future__ import annotations

import array
import hashlib

from orca_jax.scheduler.block_pool import BlockPool
from orca_jax.scheduler.request import Request


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    """The content key of a full block: BLAKE2b-128 of the previous block's key (b"" for a
    sequence's first block) and the block's token ids, so it names the whole prefix."""
    return hashlib.blake2b(parent + array.array("q", tokens).tobytes(), digest_size=16).digest()


def root_key(request: Request) -> bytes:
    """The parent of a request's first block key: b"" without a LoRA adapter, else a digest
    of the adapter's id, so prefixes computed under different adapters never match."""
    if not request.lora_int_id:
        return b""
    return hashlib.blake2b(b"lora:%d" % request.lora_int_id, digest_size=16).digest()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


class KVCacheManager:
    """Maps each request to the ordered list of blocks holding its K/V.

    Token at position p of a request lives in block `block_ids[p // block_size]`, slot
    `p % block_size`. Two policies use it differently: `allocate_slots` grows a table as tokens
    arrive (paged), `reserve` takes the worst case at admission (orca, static).

    With `enable_prefix_caching`, every block a request has filled with computed K/V is
    registered under a key naming its whole prefix: a 128-bit BLAKE2b digest of the previous
    block's key and the block's tokens (`block_key`). A request starting (or restarting after
    preemption) takes the longest run of its leading full blocks found so
    (`claim_cached_prefix`), sharing them read-only, and computes from there. Only full
    blocks are shared and a request always computes at least its last token, so no request
    writes into a block another one reads. A cryptographic digest, not Python's `hash`, so
    that nobody can craft a prompt whose key collides with another user's prefix and read
    that user's K/V.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.block_pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        # req_id -> its blocks in position order; a request absent here holds no block.
        self.req_to_block_ids: dict[str, list[int]] = {}
        # req_id -> keys of its leading blocks registered so far (prefix caching).
        self._req_keys: dict[str, list[bytes]] = {}
        # Tokens of requests that started (or restarted), and how many were found cached.
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0

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

    def block_table(self, req_id: str) -> list[int]:
        """The request's block table as held, without a copy: the manager never changes a
        table in place (growing it builds a new list), so a caller may keep it but must
        not modify it. What `schedule()` hands out every iteration, at O(1) per request."""
        return self.req_to_block_ids.get(req_id, [])

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
        """Drop the request's hold on all its blocks (no-op if it holds none); cached ones
        stay findable until the pool hands them out again, the request's last block first."""
        self._req_keys.pop(request.req_id, None)
        block_ids = self.req_to_block_ids.pop(request.req_id, None)
        if block_ids:
            # Last block first: the pool hands out (evicts) the oldest freed first, so a
            # cached prefix loses its tail before its head, and a restart still finds the head.
            self.block_pool.free(reversed(block_ids))

    def claim_cached_prefix(self, request: Request) -> int:
        """Give a request that holds no blocks the cached blocks of its longest known prefix
        (full blocks, at most all tokens but the last) and mark those tokens computed.
        Returns how many tokens that saves (0 without prefix caching, and for a request that
        has yet to score its prompt: every prompt token must be computed for that)."""
        scoring = request.sampling_params.prompt_logprobs is not None
        if (
            not self.enable_prefix_caching
            or request.req_id in self.req_to_block_ids
            or (scoring and not request.output_token_ids)
        ):
            return 0
        tokens, S = request.all_token_ids, self.block_size
        blocks, keys = [], []
        for i in range((len(tokens) - 1) // S):
            key = block_key(keys[-1] if keys else root_key(request), tokens[i * S : (i + 1) * S])
            block_id = self.block_pool.lookup(key)
            if block_id is None:
                break
            blocks.append(block_id)
            keys.append(key)
        for block_id in blocks:
            self.block_pool.hold(block_id)
        if blocks:
            self.req_to_block_ids[request.req_id] = blocks
            self._req_keys[request.req_id] = keys
            request.num_computed_tokens = len(blocks) * S
        return len(blocks) * S

    def unclaim(self, request: Request) -> None:
        """Undo `claim_cached_prefix` for a request that could not start after all."""
        self.free(request)
        request.num_computed_tokens = 0

    def record_start(self, request: Request, num_cached: int) -> None:
        """Count a request that started with `num_cached` tokens from the cache (the hit
        rate's figures; a first start also sets the request's `num_cached_tokens`); no-op
        without prefix caching."""
        if not self.enable_prefix_caching:
            return
        self.num_prefix_queries += request.num_tokens
        self.num_prefix_hits += num_cached
        if request.num_preemptions == 0:  # restarts find their own blocks: not a prompt hit
            request.num_cached_tokens = num_cached

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's blocks that its computed tokens have filled since the last
        call (no-op without prefix caching)."""
        if not self.enable_prefix_caching:
            return
        S = self.block_size
        keys = self._req_keys.setdefault(request.req_id, [])
        block_ids = self.req_to_block_ids.get(request.req_id, [])
        tokens = request.all_token_ids
        for i in range(len(keys), request.num_computed_tokens // S):
            key = block_key(keys[-1] if keys else root_key(request), tokens[i * S : (i + 1) * S])
            self.block_pool.cache(block_ids[i], key)
            keys.append(key)

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
