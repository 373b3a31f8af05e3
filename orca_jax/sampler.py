"""Sampling on the device, per request: penalties, logit bias, greedy, temperature, top-k,
min-p, top-p, seeded.

Each request's randomness is `fold_in(key(seed), step)` where `step` counts the tokens it has
generated, so a request samples the same tokens alone or in any batch, at any row.

Penalties, as vLLM defines them, change the logits before anything else (greedy included):
repetition (over prompt and output tokens: a seen token's logit is divided by r when
positive, multiplied by r otherwise), then frequency and presence (over output tokens:
minus f x count, minus p if present). Then a sparse logit bias is added (OpenAI's
`logit_bias`; -inf keeps a token out, as `min_tokens` does with stop tokens). The tokens come
as a padded `history [R, W]` and the bias as `bias_ids, bias_values [R, B]`: W and B are 0
when no row changes its logits (those batches pay nothing) and fixed widths otherwise (the
engine's max_model_len and max_logit_bias), so processing adds one compiled shape per
request bucket, which the warm-up covers. Last, structured outputs (`orca_jax.structured`)
and `allowed_token_ids` send the tokens a row may not take to -inf: `allowed [R, M]` is a
bitmask (bit t % 32 of word t // 32; rows without a constraint all ones), M = 0 or
ceil(V / 32). So a request bucket has four sampler shapes (plain, processed, masked, both),
all warmed up.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


class RowSampling(NamedTuple):
    """One request's sampling inputs for a step (defaults: no penalties)."""

    temperature: float
    top_k: int
    top_p: float
    seed: int
    step: int  # tokens generated so far
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    prompt: Sequence[int] = ()  # token ids the penalties read (only when some is on)
    output: Sequence[int] = ()
    bias: Sequence[tuple[int, float]] = ()  # (token id, added to its logit); repeats add up
    allowed: np.ndarray | None = None  # i32[M] bitmask of the tokens that may come next
    min_p: float = 0.0  # drop tokens below min_p x the top probability (0: off)
    # Instead of `prompt` and `output`: (its row of the `history_table` given to `build`,
    # how many of that row's tokens are prompt); the engine's way (`TokenHistory`).
    history: tuple[int, int] | None = None

    @property
    def penalized(self) -> bool:
        return bool(self.presence or self.frequency or self.repetition != 1.0)


_GREEDY = RowSampling(0.0, 0, 1.0, 0, 0)


@struct.dataclass
class SamplingMetadata:
    """Per-request sampling settings of one step, padded to the request bucket R."""

    temperature: jax.Array  # f32[R]; 0 means greedy
    top_k: jax.Array  # i32[R]; 0 means no top-k cut
    top_p: jax.Array  # f32[R]; 1 means no nucleus cut
    min_p: jax.Array  # f32[R]; 0 means no min-p cut
    seeds: jax.Array  # u32[R] per-request seed
    steps: jax.Array  # i32[R] tokens generated so far (the key is folded with it)
    presence: jax.Array  # f32[R]; 0 means off
    frequency: jax.Array  # f32[R]; 0 means off
    repetition: jax.Array  # f32[R]; 1 means off
    history: jax.Array  # i32[R, W] prompt then output tokens of penalized rows, -1 padded
    num_prompt: jax.Array  # i32[R] how many of a row's history tokens are prompt
    bias_ids: jax.Array  # i32[R, B] tokens whose logit is biased, -1 padded
    bias_values: jax.Array  # f32[R, B] what is added to them
    allowed: jax.Array  # i32[R, M] bitmask of the tokens each row may sample (M = 0: all)

    @classmethod
    def greedy(
        cls, num_reqs: int, history_width: int = 0, bias_width: int = 0, mask_words: int = 0
    ) -> SamplingMetadata:
        """All-greedy rows (warm-up, and the shapes a follower process receives into)."""
        md = cls.build([_GREEDY] * num_reqs, num_reqs)
        return md.replace(
            history=np.full((num_reqs, history_width), -1, np.int32),
            bias_ids=np.full((num_reqs, bias_width), -1, np.int32),
            bias_values=np.zeros((num_reqs, bias_width), np.float32),
            allowed=np.full((num_reqs, mask_words), -1, np.int32),
        )

    @classmethod
    def build(
        cls,
        rows: Sequence[tuple],
        num_reqs: int,
        history_width: int = 0,
        bias_width: int = 0,
        mask_words: int = 0,
        history_table: np.ndarray | None = None,
    ) -> SamplingMetadata:
        """From one row per request, padded greedy to R: `(temperature, top_k, top_p, seed,
        step)`, or a `RowSampling` with penalties or a bias (kept to those rows: this runs
        every iteration). When some row has either, the batch carries both a history of
        width W = `history_width` (at least a penalized row's prompt + output length) and a
        bias of width B = `bias_width` (at least a row's bias entries). Penalized rows give
        their tokens as `prompt` and `output`, or as a row of `history_table`
        (i32[slots, W], -1 padded, row 0 all -1), gathered in one go. When some row has an
        `allowed` mask, the batch carries masks of `mask_words` words. `min_p` costs no
        shape: every batch carries its column."""
        pad = [_GREEDY[:5]] * (num_reqs - len(rows))
        t, k, p, seed, step = zip(*(r[:5] for r in rows), *pad, strict=True)
        presence = np.zeros(num_reqs, np.float32)
        frequency = np.zeros(num_reqs, np.float32)
        repetition = np.ones(num_reqs, np.float32)
        num_prompt = np.zeros(num_reqs, np.int32)
        min_p = np.zeros(num_reqs, np.float32)
        slots = np.zeros(num_reqs, np.intp)  # rows of history_table; 0: all -1
        at = [i for i, r in enumerate(rows) if len(r) > 5]  # the RowSampling rows
        full = [rows[i] if isinstance(rows[i], RowSampling) else RowSampling(*rows[i]) for i in at]
        cols = RowSampling(*zip(*full, strict=True)) if full else None  # a column per field
        penalized, biased, masked = [], [], []
        if full:  # the numeric columns in one assignment each
            min_p[at], presence[at] = cols.min_p, cols.presence
            frequency[at], repetition[at] = cols.frequency, cols.repetition
            on = (presence[at] != 0) | (frequency[at] != 0) | (repetition[at] != 1)
            penalized = [(at[j], full[j]) for j in np.flatnonzero(on).tolist()]
            biased = [(at[j], full[j]) for j, b in enumerate(cols.bias) if b]
            masked = [(at[j], m) for j, m in enumerate(cols.allowed) if m is not None]
        allowed = np.full((num_reqs, mask_words if masked else 0), -1, np.int32)
        for i, mask in masked:
            allowed[i] = mask  # raises unless it has mask_words words
        listed = [(i, r) for i, r in penalized if r.history is None]  # prompt and output
        tokens = max((len(r.prompt) + len(r.output) for _, r in listed), default=0)
        if tokens > history_width:
            raise ValueError(f"a penalized row has {tokens} tokens; history_width={history_width}")
        entries = max((len(r.bias) for _, r in biased), default=0)
        if entries > bias_width:
            raise ValueError(f"a row has {entries} bias entries; bias_width={bias_width}")
        W, B = (history_width, bias_width) if penalized or biased else (0, 0)
        if penalized:
            idx = [i for i, _ in penalized]
            num_prompt[idx] = [r.history[1] if r.history else len(r.prompt) for _, r in penalized]
            slots[idx] = [r.history[0] if r.history else 0 for _, r in penalized]
        if slots.any():
            if history_table is None or history_table.shape[1] != W:
                raise ValueError(f"rows name a history table, which must be given with width {W}")
            history = history_table[slots]  # one gather; row 0 pads
        else:
            history = np.full((num_reqs, W), -1, np.int32)
        for i, r in listed:
            n_prompt, n_output = len(r.prompt), len(r.output)
            history[i, :n_prompt] = r.prompt
            history[i, n_prompt : n_prompt + n_output] = r.output
        bias_ids = np.full((num_reqs, B), -1, np.int32)
        bias_values = np.zeros((num_reqs, B), np.float32)
        for i, r in biased:
            bias_ids[i, : len(r.bias)], bias_values[i, : len(r.bias)] = zip(*r.bias, strict=True)
        return cls(
            temperature=np.asarray(t, np.float32),
            top_k=np.asarray(k, np.int32),
            top_p=np.asarray(p, np.float32),
            min_p=min_p,
            seeds=np.asarray(seed, np.uint32),
            steps=np.asarray(step, np.int32),
            presence=presence,
            frequency=frequency,
            repetition=repetition,
            history=history,
            num_prompt=num_prompt,
            bias_ids=bias_ids,
            bias_values=bias_values,
            allowed=allowed,
        )


def process_logits(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """Penalties, then the logit bias, then the structured-output mask, on f32 logits
    [R, V] (module docstring)."""
    R, V = logits.shape
    logits = apply_penalties(logits, md)
    if md.bias_ids.shape[1]:  # static: some row has a bias
        rows = jnp.broadcast_to(jnp.arange(R)[:, None], md.bias_ids.shape)
        ids = jnp.where(md.bias_ids >= 0, md.bias_ids, V)  # padding scatters out of range
        logits = logits.at[rows, ids].add(md.bias_values, mode="drop")
    if md.allowed.shape[1]:  # static: some row is constrained
        v = jnp.arange(V)
        bits = jnp.right_shift(md.allowed[:, v // 32], v % 32) & 1  # [R, V]
        logits = jnp.where(bits == 1, logits, -jnp.inf)
    return logits


def apply_penalties(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """Repetition, frequency and presence penalties on f32 logits [R, V] (module docstring)."""
    R, V = logits.shape
    W = md.history.shape[1]
    if W == 0:  # static: no row has penalties
        return logits
    rows = jnp.broadcast_to(jnp.arange(R)[:, None], (R, W))
    ids = jnp.where(md.history >= 0, md.history, V)  # padding scatters out of range: dropped
    is_output = jnp.arange(W)[None, :] >= md.num_prompt[:, None]  # [R, W]
    seen = jnp.zeros((R, V), jnp.bool_).at[rows, ids].set(True, mode="drop")
    counts = jnp.zeros((R, V), jnp.float32).at[rows, ids].add(is_output, mode="drop")
    rep = md.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - md.frequency[:, None] * counts - md.presence[:, None] * (counts > 0)


def _sample_row(logits, temperature, top_k, top_p, min_p, seed, step):
    """One request: [V] logits -> sampled token id (temperature > 0 assumed).

    Cuts, as vLLM applies them: top-k and min-p (p / p_max >= min_p, on the tempered
    distribution: a ratio, so the order of the two does not matter), then top-p over what is
    left, renormalized."""
    V = logits.shape[0]
    scaled = logits / temperature
    order = jnp.argsort(-scaled)  # [V] most likely first
    sorted_logits = scaled[order]
    rank = jnp.arange(V)
    keep = jnp.where(top_k > 0, rank < top_k, True)
    keep &= sorted_logits >= sorted_logits[0] + jnp.log(min_p)  # log 0 = -inf: all kept
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
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Next token per request.

    Returns (tokens i32[R], logprob of each token f32[R], top token ids i32[R, n],
    their logprobs f32[R, n], each token's rank i32[R] (1: the most likely)) with
    n = num_top_logprobs; log-probabilities and ranks are those of the model's raw
    distribution (before penalties, temperature and cuts), as vLLM reports them.
    """
    raw = logits.astype(jnp.float32)
    logits = process_logits(raw, md)
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    is_greedy = md.temperature <= 0

    def sampled():
        temperature = jnp.where(is_greedy, 1.0, md.temperature)
        toks = jax.vmap(_sample_row)(
            logits, temperature, md.top_k, md.top_p, md.min_p, md.seeds, md.steps
        )
        return jnp.where(is_greedy, greedy_tokens, toks.astype(jnp.int32))

    # Sorting the vocabulary is skipped entirely when every request is greedy.
    tokens = jax.lax.cond(jnp.all(is_greedy), lambda: greedy_tokens, sampled)
    logprobs = jax.nn.log_softmax(raw, axis=-1)
    token_logprobs = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logprobs, num_top_logprobs)
    return tokens, token_logprobs, top_ids.astype(jnp.int32), top_lp, rank_of(logprobs, tokens)


def rank_of(logprobs: jax.Array, tokens: jax.Array) -> jax.Array:
    """i32[R]: 1 + how many tokens of each row's [V] logprobs are more likely than its token
    (ties share the better rank)."""
    own = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)
    return 1 + jnp.sum(logprobs > own, axis=-1, dtype=jnp.int32)
