"""On-device sampling: cuts, seeds, and independence from the rest of the batch."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orca_jax.engine.token_history import TokenHistory
from orca_jax.sampler import (
    RowSampling,
    SamplingMetadata,
    apply_penalties,
    process_logits,
    sample,
)


def _logits(rows, vocab=64, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(rows, vocab)) * 3, jnp.float32)


def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    logits = _logits(5)
    toks, lp, top_ids, top_lp, rank = sample(logits, SamplingMetadata.greedy(5), 3)
    np.testing.assert_array_equal(toks, np.argmax(logits, -1))
    want = jax.nn.log_softmax(logits)[np.arange(5), np.argmax(logits, -1)]
    np.testing.assert_allclose(lp, want, rtol=1e-6)
    np.testing.assert_array_equal(top_ids[:, 0], toks)
    assert top_lp.shape == (5, 3) and (np.diff(np.asarray(top_lp), axis=1) <= 0).all()
    np.testing.assert_array_equal(rank, 1)


def test_ranks_count_the_more_likely_tokens():
    """A sampled token's rank is 1 + how many tokens the raw distribution puts above it."""
    logits = _logits(400, vocab=16, seed=9)
    md = SamplingMetadata.build([(2.0, 0, 1.0, s, 0) for s in range(400)], 400)
    toks, _, _, _, rank = (np.asarray(a) for a in sample(logits, md))
    raw = np.asarray(logits)
    np.testing.assert_array_equal(rank, 1 + (raw > raw[np.arange(400), toks][:, None]).sum(-1))
    assert len(set(rank.tolist())) > 3  # hot sampling: many ranks came up


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = _logits(6)
    md = SamplingMetadata.build(
        [(1.5, 1, 1.0, i, 0) for i in range(3)] + [(1.5, 0, 1e-6, i, 0) for i in range(3)], 6
    )
    toks, *_ = sample(logits, md)
    np.testing.assert_array_equal(toks, np.argmax(logits, -1))


def test_seeded_row_is_independent_of_batch_and_row():
    logits = _logits(8)
    row = (0.9, 20, 0.9, 1234, 7)
    alone, *_ = sample(logits[3:4], SamplingMetadata.build([row], 1))
    mixed_rows = [(1.0, 0, 1.0, s, 0) for s in range(8)]
    mixed_rows[5] = row
    perm = logits[jnp.array([0, 1, 2, 4, 6, 3, 7, 5])]  # row 3's logits now at index 5
    mixed, *_ = sample(perm, SamplingMetadata.build(mixed_rows, 8))
    assert int(mixed[5]) == int(alone[0])


def test_temperature_sampling_follows_the_distribution():
    """Empirical frequencies over many seeds match softmax(logits / T) with top-k cut."""
    vocab, n = 8, 4000
    base = jnp.asarray(np.random.default_rng(3).normal(size=vocab), jnp.float32)
    logits = jnp.tile(base, (n, 1))
    md = SamplingMetadata.build([(0.7, 4, 1.0, s, 0) for s in range(n)], n)
    toks = np.asarray(sample(logits, md)[0])
    order = np.argsort(-np.asarray(base))
    p = np.zeros(vocab)
    p[order[:4]] = np.asarray(jax.nn.softmax(base[order[:4]] / 0.7))
    freq = np.bincount(toks, minlength=vocab) / n
    assert set(np.nonzero(freq)[0]) <= set(order[:4].tolist())
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(0.25 / n))


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (2000, 1))
    md = SamplingMetadata.build([(1.0, 0, 0.75, s, 0) for s in range(2000)], 2000)
    toks = np.asarray(sample(logits, md)[0])
    assert set(toks.tolist()) == {0, 1}  # 0.5 < 0.75 so token 1 is needed; 0.8 >= 0.75 stops


def _penalized_reference(logits, prompt, output, presence, frequency, repetition):
    """vLLM's penalties for one row, token by token in plain Python."""
    out = np.array(logits, np.float64)
    for tok in set(prompt) | set(output):
        out[tok] = out[tok] / repetition if out[tok] > 0 else out[tok] * repetition
    for tok, count in collections.Counter(output).items():
        out[tok] -= frequency * count + presence
    return out


def test_penalties_match_a_per_token_reference():
    vocab = 40
    logits = _logits(5, vocab, seed=1)
    rng = np.random.default_rng(2)
    specs = [  # presence, frequency, repetition, prompt length, output length
        (0.5, 0.0, 1.0, 7, 12),
        (0.0, 0.3, 1.0, 3, 20),
        (0.0, 0.0, 1.7, 9, 5),
        (0.0, 0.0, 1.0, 4, 4),  # no penalties: untouched, and its tokens are not sent
        (-1.0, 1.5, 0.6, 30, 9),
    ]
    rows, want = [], []
    for r, (pres, freq, rep, n_p, n_o) in enumerate(specs):
        prompt = rng.integers(0, vocab, n_p).tolist()
        output = rng.integers(0, 8, n_o).tolist()  # few distinct ids: repeats
        rows.append(RowSampling(0.0, 0, 1.0, 0, n_o, pres, freq, rep, prompt, output))
        want.append(_penalized_reference(logits[r], prompt, output, pres, freq, rep))
    md = SamplingMetadata.build(rows, 6, history_width=48)  # one padding row
    assert md.history.shape == (6, 48)
    assert (md.history[3] == -1).all() and (md.history[5] == -1).all()
    got = apply_penalties(jnp.concatenate([logits, logits[:1]]), md)
    np.testing.assert_allclose(got[:5], np.stack(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[5], logits[0])  # padding row untouched

    toks, lp, *_ = sample(jnp.concatenate([logits, logits[:1]]), md)
    np.testing.assert_array_equal(toks[:5], np.argmax(np.stack(want), -1))  # greedy too
    raw = jax.nn.log_softmax(logits)[np.arange(5), np.asarray(toks[:5])]
    np.testing.assert_allclose(lp[:5], raw, rtol=1e-6)  # logprobs stay the model's


def test_history_rows_gather_the_same_history_as_token_lists():
    """The engine's way: penalized rows name a row of a `TokenHistory` table, topped up as
    tokens come; the batch's history equals the one built from prompt and output lists.
    Rows go back on release (cleared) and the table grows when all are taken."""
    rng = np.random.default_rng(5)
    table = TokenHistory(width=16, slots=2)  # one usable row: the others come by growing
    listed, named = [], []
    for n_p, n_o in [(3, 4), (6, 0), (1, 9)]:
        prompt, output = rng.integers(0, 50, n_p).tolist(), rng.integers(0, 50, n_o).tolist()
        slot = table.acquire(prompt)
        for k in range(n_o + 1):  # one token at a time, as the engine tops it up
            table.extend(slot, output[:k], n_p + k)
        listed.append(RowSampling(0.0, 0, 1.0, 0, n_o, 0.1, 0.2, 1.3, prompt, output))
        named.append(RowSampling(0.0, 0, 1.0, 0, n_o, 0.1, 0.2, 1.3, history=(slot, n_p)))
    assert table.num_used == 3 and len(table.table) == 4
    plain = (0.0, 0, 1.0, 0, 0)
    want = SamplingMetadata.build([listed[0], plain, *listed[1:]], 5, history_width=16)
    got = SamplingMetadata.build([named[0], plain, *named[1:]], 5, 16, 0, 0, table.table)
    for field in ("history", "num_prompt", "presence", "frequency", "repetition"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), field)
    table.release(named[2].history[0])
    assert (table.table[named[2].history[0]] == -1).all() and (table.table[0] == -1).all()
    assert table.acquire([7]) == named[2].history[0] and table.num_used == 3
    with pytest.raises(ValueError, match="history table"):
        SamplingMetadata.build(named, 3, history_width=16)


def test_batches_without_penalties_send_no_history():
    md = SamplingMetadata.build([(0.8, 5, 0.9, 1, 3)] * 3, 4, history_width=64)
    assert md.history.shape == (4, 0)
    assert md.bias_ids.shape == md.bias_values.shape == (4, 0)
    with pytest.raises(ValueError, match="history_width=8"):
        SamplingMetadata.build([RowSampling(0.0, 0, 1.0, 0, 0, 0.5, output=[1] * 9)], 1, 8)
    with pytest.raises(ValueError, match="3 bias entries; bias_width=2"):
        SamplingMetadata.build([RowSampling(0.0, 0, 1.0, 0, 0, bias=[(1, 1.0)] * 3)], 1, 8, 2)


def test_logit_bias_is_added_after_the_penalties():
    """Per row: penalties (as in the reference above), then each (id, bias) added; repeats
    add up and -inf bans a token. Rows without a bias or penalty are untouched."""
    vocab = 32
    logits = _logits(4, vocab, seed=3)
    rows = [
        RowSampling(0.0, 0, 1.0, 0, 2, bias=[(3, 5.0), (7, -2.5), (3, 1.0)]),
        RowSampling(0.0, 0, 1.0, 0, 2, 0.5, 0.0, 1.3, [1, 2], [4, 4], bias=[(4, -np.inf)]),
        (0.0, 0, 1.0, 0, 0),  # plain
    ]
    want = np.array(logits[:3], np.float64)
    want[0, 3] += 6.0
    want[0, 7] -= 2.5
    want[1] = _penalized_reference(logits[1], [1, 2], [4, 4], 0.5, 0.0, 1.3)
    want[1, 4] = -np.inf
    md = SamplingMetadata.build(rows, 4, history_width=8, bias_width=4)  # one padding row
    assert md.bias_ids.shape == (4, 4) and (md.bias_ids[2:] == -1).all()
    got = np.asarray(process_logits(logits, md))
    np.testing.assert_allclose(got[:3], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[3], logits[3])

    md = SamplingMetadata.build([RowSampling(0.0, 0, 1.0, 0, 0, bias=[(9, 100.0)])] * 4, 4, 8, 4)
    toks, lp, *_ = sample(logits, md)
    np.testing.assert_array_equal(toks, [9] * 4)  # forced, greedy
    np.testing.assert_allclose(lp, jax.nn.log_softmax(logits)[:, 9], rtol=1e-6)  # raw logprobs


def test_min_p_keeps_tokens_near_the_top_after_temperature():
    """vLLM's min_p: a token stays if its tempered probability is at least min_p times the
    largest; with top-p, the nucleus is taken over what min_p left (renormalized)."""
    probs = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (3000, 1))

    def support(temperature, min_p, top_p=1.0):
        rows = [RowSampling(temperature, 0, top_p, s, 0, min_p=min_p) for s in range(3000)]
        toks = np.asarray(sample(logits, SamplingMetadata.build(rows, 3000))[0])
        return set(toks.tolist()), toks

    tempered = probs ** (1 / 0.5) / (probs ** (1 / 0.5)).sum()  # T = 0.5 sharpens
    # T = 1: 0.1 / 0.4 = 0.25 >= 0.2 stays, 0.05 / 0.4 does not.
    assert support(1.0, 0.2)[0] == {0, 1, 2, 3}
    # T = 0.5: ratios square, (0.15 / 0.4)^2 = 0.14 < 0.2, (0.3 / 0.4)^2 = 0.56 stays.
    assert (tempered / tempered[0] >= 0.2).sum() == 2
    kept, toks = support(0.5, 0.2)
    assert kept == {0, 1}
    freq = np.bincount(toks, minlength=5)[:2] / len(toks)
    want = tempered[:2] / tempered[:2].sum()
    np.testing.assert_allclose(freq, want, atol=4 * np.sqrt(0.25 / len(toks)))
    # min_p 0.3 leaves {0.4, 0.3, 0.15} = 0.85, renormalized 0.47, 0.35, 0.18. Top-p 0.8:
    # 0.47 + 0.35 = 0.82 reaches it -> {0, 1} (on the raw 0.4 + 0.3 = 0.7 it would not);
    # top-p 0.9 needs the third.
    assert support(1.0, 0.3, top_p=0.8)[0] == {0, 1}
    assert support(1.0, 0.3, top_p=0.9)[0] == {0, 1, 2}
    assert support(1.0, 0.0)[0] == {0, 1, 2, 3, 4}  # off
    assert support(1.0, 1.0)[0] == {0}  # only the most likely
