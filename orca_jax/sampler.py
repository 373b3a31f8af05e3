"""Sampling on the device, per request: greedy, temperature, top-k, top-p, seeded.

Each request's randomness is `fold_in(key(seed), step)` where `step` counts the tokens it has
generated, so a request samples the same tokens alone or in any batch, at any row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class SamplingMetadata:
    """Per-request sampling settings of one step, padded to the request bucket R."""

    temperature: jax.Array  # f32[R]; 0 means greedy
    top_k: jax.Array  # i32[R]; 0 means no top-k cut
    top_p: jax.Array  # f32[R]; 1 means no nucleus cut
    seeds: jax.Array  # u32[R] per-request seed
    steps: jax.Array  # i32[R] tokens generated so far (the key is folded with it)

    @classmethod
    def greedy(cls, num_reqs: int) -> SamplingMetadata:
        return cls.build([(0.0, 0, 1.0, 0, 0)] * num_reqs, num_reqs)

    @classmethod
    def build(
        cls, rows: list[tuple[float, int, float, int, int]], num_reqs: int
    ) -> SamplingMetadata:
        """From `(temperature, top_k, top_p, seed, step)` per request, padded greedy to R."""
        pad = [(0.0, 0, 1.0, 0, 0)] * (num_reqs - len(rows))
        t, k, p, s, n = zip(*(list(rows) + pad), strict=True)
        return cls(
            temperature=np.asarray(t, np.float32),
            top_k=np.asarray(k, np.int32),
            top_p=np.asarray(p, np.float32),
            seeds=np.asarray(s, np.uint32),
            steps=np.asarray(n, np.int32),
        )


def _sample_row(logits, temperature, top_k, top_p, seed, step):
    """One request: [V] logits -> sampled token id (temperature > 0 assumed)."""
    V = logits.shape[0]
    scaled = logits / temperature
    order = jnp.argsort(-scaled)  # [V] most likely first
    sorted_logits = scaled[order]
    rank = jnp.arange(V)
    keep = jnp.where(top_k > 0, rank < top_k, True)
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf))
    mass_before = jnp.cumsum(probs) - probs  # probability of strictly more likely tokens
    keep &= mass_before < top_p  # the most likely token always stays
    key = jax.random.fold_in(jax.random.key(seed), step)
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf))
    return order[choice]


@functools.partial(jax.jit, static_argnames=("num_top_logprobs",))
def sample(
    logits: jax.Array,  # f32[R, V]
    md: SamplingMetadata,
    num_top_logprobs: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Next token per request.

    Returns (tokens i32[R], logprob of each token f32[R], top token ids i32[R, n],
    their logprobs f32[R, n]) with n = num_top_logprobs; log-probabilities are those of the
    model's raw distribution (before temperature and cuts), as vLLM reports them.
    """
    logits = logits.astype(jnp.float32)
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    is_greedy = md.temperature <= 0

    def sampled():
        temperature = jnp.where(is_greedy, 1.0, md.temperature)
        toks = jax.vmap(_sample_row)(logits, temperature, md.top_k, md.top_p, md.seeds, md.steps)
        return jnp.where(is_greedy, greedy_tokens, toks.astype(jnp.int32))

    # Sorting the vocabulary is skipped entirely when every request is greedy.
    tokens = jax.lax.cond(jnp.all(is_greedy), lambda: greedy_tokens, sampled)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    token_logprobs = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logprobs, num_top_logprobs)
    return tokens, token_logprobs, top_ids.astype(jnp.int32), top_lp
