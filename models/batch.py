"""The packed ragged token batch: the one contract between host and device.

Tokens of all scheduled requests (prefill chunks and single decode tokens alike) are
concatenated on one token axis T; per-request metadata (R rows) says where each request's
tokens start, how long its context is and which KV pages it owns. T and R are padded to shape
buckets; padding tokens write their K/V to the reserved null slot 0 and padding requests have
`cu_q_lens[r + 1] == cu_q_lens[r]`, so they own no tokens.
"""

from __future__ import annotations

import itertools

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
    # i32[R] packed rows whose logits are returned, request after request: each request's
    # last scheduled token, or (speculative decoding) its last 1 + drafts tokens; 0-padded.
    logits_indices: jax.Array
    # i32[] number of real requests; rows >= num_reqs are padding.
    num_reqs: jax.Array
    # i32[T] LoRA slot of each token's request (-1: none; padding too); None when the runner
    # serves no adapters (models/lora.py).
    lora_slots: jax.Array | None = None

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


def geometric_buckets(lo: int, hi: int, factor: int = 2) -> tuple[int, ...]:
    """lo, lo * factor, lo * factor**2, ... below hi, then hi itself."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= factor
    out.append(hi)
    return tuple(out)


def pack_batch(
    seqs: list[tuple[list[int], int, list[int]]],
    *,
    page_size: int,
    num_tokens: int,
    num_reqs: int,
    max_blocks: int,
    lora_slots: list[int] | None = None,
) -> RaggedBatch:
    """Pack requests into a padded numpy `RaggedBatch`.

    Args:
      seqs: per request `(token_ids, start_pos, block_ids)`: the tokens fed this step, the
        position of the first one (tokens already cached), and the request's page table.
      page_size: tokens per KV page.
      num_tokens, num_reqs, max_blocks: the padded bucket sizes T, R and pages per request.
      lora_slots: per request its LoRA slot (-1: none), for a model serving adapters.
    """
    n = len(seqs)
    q_lens = np.fromiter((len(t) for t, _, _ in seqs), np.int32, n)
    num_blocks = np.fromiter((len(b) for _, _, b in seqs), np.int32, n)
    if n and num_blocks.max() > max_blocks:
        r = int(np.argmax(num_blocks))
        raise ValueError(f"request {r} owns {num_blocks[r]} pages > max_blocks={max_blocks}")
    block_tables = np.zeros((n, max_blocks), np.int32)
    block_tables[np.arange(max_blocks) < num_blocks[:, None]] = np.fromiter(
        itertools.chain.from_iterable(b for _, _, b in seqs), np.int32, int(num_blocks.sum())
    )
    return pack_arrays(
        np.fromiter(
            itertools.chain.from_iterable(t for t, _, _ in seqs), np.int32, int(q_lens.sum())
        ),
        q_lens,
        np.fromiter((s for _, s, _ in seqs), np.int32, n),
        block_tables,
        num_blocks,
        page_size=page_size,
        num_tokens=num_tokens,
        num_reqs=num_reqs,
        lora_slots=None if lora_slots is None else np.asarray(lora_slots, np.int32),
    )


def pack_arrays(
    token_ids: np.ndarray,  # i32[total] new tokens of all requests, request after request
    q_lens: np.ndarray,  # i32[n] new tokens per request
    starts: np.ndarray,  # i32[n] position of each request's first new token
    block_tables: np.ndarray,  # i32[n, max_blocks] page tables (0 beyond num_blocks)
    num_blocks: np.ndarray,  # i32[n] pages each request owns
    *,
    page_size: int,
    num_tokens: int,
    num_reqs: int,
    num_logits: np.ndarray | None = None,
    lora_slots: np.ndarray | None = None,
) -> RaggedBatch:
    """The vectorised core of `pack_batch`: pad per-request arrays to the (T, R) bucket.

    `num_logits` i32[n]: how many of each request's last tokens give logits (default one
    each; more to verify drafts). R bounds their sum as well as the requests.
    `lora_slots` i32[n]: each request's LoRA slot (-1: none), spread over its tokens."""
    n = len(q_lens)
    total = len(token_ids)
    rows = n if num_logits is None else int(num_logits.sum())
    if total > num_tokens or max(n, rows) > num_reqs:
        raise ValueError(
            f"{total} tokens / {n} requests / {rows} logits rows exceed bucket "
            f"({num_tokens}, {num_reqs})"
        )
    kv_lens = starts + q_lens
    bad = (q_lens < 1) | (-(-kv_lens // page_size) > num_blocks)
    if bad.any():
        r = int(np.argmax(bad))
        raise ValueError(
            f"request {r}: {q_lens[r]} new tokens, context {kv_lens[r]}, {num_blocks[r]} pages "
            f"(needs >= 1 token and pages for its whole context)"
        )
    if num_logits is not None and ((num_logits < 1) | (num_logits > q_lens)).any():
        r = int(np.argmax((num_logits < 1) | (num_logits > q_lens)))
        raise ValueError(f"request {r}: {num_logits[r]} logits rows for {q_lens[r]} tokens")
    cu = np.zeros(n + 1, np.int32)
    np.cumsum(q_lens, out=cu[1:])
    if num_logits is None:
        logits_indices = cu[1:] - 1
    else:  # request r's rows: cu[r + 1] - num_logits[r], ..., cu[r + 1] - 1
        first = np.cumsum(num_logits) - num_logits  # each request's first row of the output
        logits_indices = np.arange(rows, dtype=np.int32) + np.repeat(
            cu[1:] - num_logits - first, num_logits
        )
    req_of_token = np.repeat(np.arange(n, dtype=np.int32), q_lens)
    pos = np.arange(total, dtype=np.int32) - np.repeat(cu[:-1] - starts, q_lens)

    def padded(values, size):
        out = np.zeros(size, np.int32)
        out[: len(values)] = values
        return out

    tables = np.zeros((num_reqs, block_tables.shape[1]), np.int32)
    tables[:n] = block_tables
    cu_q_lens = np.full(num_reqs + 1, total, np.int32)
    cu_q_lens[: n + 1] = cu
    return RaggedBatch(
        input_ids=padded(token_ids, num_tokens),
        positions=padded(pos, num_tokens),
        cu_q_lens=cu_q_lens,
        kv_lens=padded(kv_lens, num_reqs),
        block_tables=tables,
        # Padding tokens write to slot 0 of the null page.
        slot_mapping=padded(
            block_tables[req_of_token, pos // page_size] * page_size + pos % page_size,
            num_tokens,
        ),
        logits_indices=padded(logits_indices, num_reqs),
        num_reqs=np.int32(n),
        lora_slots=None if lora_slots is None else per_token_slots(lora_slots, q_lens, num_tokens),
    )


def per_token_slots(lora_slots: np.ndarray, q_lens: np.ndarray, num_tokens: int) -> np.ndarray:
    """i32[T]: each request's LoRA slot repeated over its tokens, then -1 for padding."""
    out = np.full(num_tokens, -1, np.int32)
    total = int(q_lens.sum())
    out[:total] = np.repeat(np.asarray(lora_slots, np.int32), q_lens)
    return out
