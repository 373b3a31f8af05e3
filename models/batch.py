"""The packed ragged token batch: the one contract between host and device.

Tokens of all scheduled requests (prefill chunks and single decode tokens alike) are
concatenated on one token axis T; per-request metadata (R rows) says where each request's
tokens start, how long its context is and which KV pages it owns. T and R are padded to shape
buckets; padding tokens write their K/V to the reserved null slot 0 and padding requests have
`cu_q_lens[r + 1] == cu_q_lens[r]`, so they own no tokens.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import struct


@struct.dataclass
class RaggedBatch:
    """One iteration's packed batch (numpy on the host, jax arrays once on the device)."""

    # i32[T] token ids of all scheduled requests, request after request, then padding.
    input_ids: jax.Array
    # i32[T] position of each token in its own sequence.
    positions: jax.Array
    # i32[R+1] where each request's tokens start on the packed axis; padding repeats the end.
    cu_q_lens: jax.Array
    # i32[R] context length of each request after this step (cached tokens + new ones).
    kv_lens: jax.Array
    # i32[R, max_blocks] KV page ids of each request; unused entries point at the null page 0.
    block_tables: jax.Array
    # i32[T] flat cache slot (page * page_size + offset) where each token's K/V is written.
    slot_mapping: jax.Array
    # i32[R] packed row whose logits give each request's next token (its last scheduled token).
    logits_indices: jax.Array
    # i32[] number of real requests; rows >= num_reqs are padding.
    num_reqs: jax.Array

    @property
    def num_tokens(self) -> int:
        """Padded token bucket T."""
        return self.input_ids.shape[0]

    @property
    def max_reqs(self) -> int:
        """Padded request bucket R."""
        return self.kv_lens.shape[0]


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two from lo up to (and including a final bucket of) hi."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(out)


def pack_batch(
    seqs: list[tuple[list[int], int, list[int]]],
    *,
    page_size: int,
    num_tokens: int,
    num_reqs: int,
    max_blocks: int,
) -> RaggedBatch:
    """Pack requests into a padded numpy `RaggedBatch`.

    Args:
      seqs: per request `(token_ids, start_pos, block_ids)`: the tokens fed this step, the
        position of the first one (tokens already cached), and the request's page table.
      page_size: tokens per KV page.
      num_tokens, num_reqs, max_blocks: the padded bucket sizes T, R and pages per request.
    """
    total = sum(len(t) for t, _, _ in seqs)
    if total > num_tokens or len(seqs) > num_reqs:
        raise ValueError(f"{total} tokens / {len(seqs)} requests exceed bucket ({num_tokens}, "
                         f"{num_reqs})")
    input_ids = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slot_mapping = np.zeros(num_tokens, np.int32)  # padding -> null slot 0
    cu_q_lens = np.full(num_reqs + 1, total, np.int32)
    kv_lens = np.zeros(num_reqs, np.int32)
    block_tables = np.zeros((num_reqs, max_blocks), np.int32)
    logits_indices = np.zeros(num_reqs, np.int32)
    t = 0
    for r, (tokens, start, blocks) in enumerate(seqs):
        n = len(tokens)
        if n == 0:
            raise ValueError(f"request {r} schedules no tokens")
        kv_len = start + n
        if -(-kv_len // page_size) > len(blocks):
            raise ValueError(f"request {r}: {kv_len} tokens need more than {len(blocks)} pages")
        if len(blocks) > max_blocks:
            raise ValueError(f"request {r} owns {len(blocks)} pages > max_blocks={max_blocks}")
        pos = np.arange(start, kv_len, dtype=np.int32)
        blocks_np = np.asarray(blocks, np.int32)
        cu_q_lens[r] = t
        input_ids[t : t + n] = tokens
        positions[t : t + n] = pos
        slot_mapping[t : t + n] = blocks_np[pos // page_size] * page_size + pos % page_size
        kv_lens[r] = kv_len
        block_tables[r, : len(blocks)] = blocks_np
        logits_indices[r] = t + n - 1
        t += n
    return RaggedBatch(
        input_ids=input_ids,
        positions=positions,
        cu_q_lens=cu_q_lens,
        kv_lens=kv_lens,
        block_tables=block_tables,
        slot_mapping=slot_mapping,
        logits_indices=logits_indices,
        num_reqs=np.int32(len(seqs)),
    )
