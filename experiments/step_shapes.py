"""Batches of known shape and a step timer, shared by the step benchmark and the calibration.

Imported by the scripts beside it (run as `python experiments/NAME.py`, which puts this
folder on the path).
"""

from __future__ import annotations

import statistics
import time

import jax

from models import pack_batch, step


def time_step(params, cfg, cache, batch, iters: int) -> tuple[float, object]:
    """Median seconds per step, each waited for (after two warm-up steps); the final cache."""
    batch = jax.device_put(batch)
    for _ in range(2):
        logits, cache = step(params, cache, batch, cfg)
    jax.block_until_ready(logits)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        logits, cache = step(params, cache, batch, cfg)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), cache


def decode_batch(num_reqs: int, context: int, page: int, num_tokens: int | None = None):
    pages_per = -(-(context + 1) // page)
    seqs = [
        ([1], context, list(range(1 + r * pages_per, 1 + (r + 1) * pages_per)))
        for r in range(num_reqs)
    ]
    return pack_batch(
        seqs,
        page_size=page,
        num_tokens=num_tokens or num_reqs,
        num_reqs=num_reqs,
        max_blocks=pages_per,
    ), 1 + num_reqs * pages_per


def prefill_batch(num_tokens: int, page: int):
    pages = -(-num_tokens // page)
    seqs = [(list(range(num_tokens)), 0, list(range(1, 1 + pages)))]
    return pack_batch(seqs, page_size=page, num_tokens=num_tokens, num_reqs=8, max_blocks=pages), (
        1 + pages
    )
