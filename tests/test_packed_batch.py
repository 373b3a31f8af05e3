"""A packed batch mixing prefills and decodes gives each request the logits it gets alone."""

import jax
import numpy as np
import pytest

from models import get_config, init_kv_cache, init_params, pack_batch, step

PAGE = 4
NUM_PAGES = 96
MAX_BLOCKS = 16


def _run(params, cfg, cache, seqs, num_tokens=64, num_reqs=16):
    batch = pack_batch(
        seqs, page_size=PAGE, num_tokens=num_tokens, num_reqs=num_reqs, max_blocks=MAX_BLOCKS
    )
    logits, cache = step(params, cache, batch, cfg)
    return np.asarray(logits)[: len(seqs)], cache


def _pages(rng, n_total, used, n):
    free = [p for p in range(1, n_total) if p not in used]
    pages = list(rng.choice(free, size=n, replace=False))
    used.update(pages)
    return [int(p) for p in pages]


@pytest.mark.parametrize(
    "name,kv_cache_dtype", [("tiny-gpt", "auto"), ("tiny-llama", "auto"), ("tiny-llama", "fp8")]
)
def test_mixed_batch_matches_each_request_alone(name, kv_cache_dtype):
    """With an fp8 cache too: each token's fp8 K/V land in its own slots, whatever the batch."""
    cfg = get_config(name, kv_cache_dtype=kv_cache_dtype)
    params = init_params(cfg, seed=1)
    rng = np.random.default_rng(0)
    # Three prefills of different lengths; five decodes at different positions.
    prefill_lens = [13, 5, 22]
    decode_ctx = [3, 8, 17, 30, 41]  # tokens already cached before the decode token
    used: set[int] = set()
    prefills = []
    for n in prefill_lens:
        toks = rng.integers(0, cfg.vocab_size, n).tolist()
        prefills.append((toks, _pages(rng, NUM_PAGES, used, -(-n // PAGE))))
    decodes = []
    for c in decode_ctx:
        toks = rng.integers(0, cfg.vocab_size, c + 1).tolist()
        decodes.append((toks, _pages(rng, NUM_PAGES, used, -(-(c + 1) // PAGE))))

    # Shared cache: first cache the decodes' contexts (packed together), then the mixed step.
    cache = init_kv_cache(cfg, NUM_PAGES, PAGE)
    _, cache = _run(params, cfg, cache, [(t[:-1], 0, b) for t, b in decodes], num_tokens=128)
    mixed = [(t, 0, b) for t, b in prefills] + [(t[-1:], len(t) - 1, b) for t, b in decodes]
    order = rng.permutation(len(mixed))  # interleave prefill and decode rows
    got, _ = _run(params, cfg, cache, [mixed[i] for i in order])

    for row, i in enumerate(order):
        toks, start, blocks = mixed[i]
        alone = init_kv_cache(cfg, NUM_PAGES, PAGE)
        if start:  # a decode: its context first, alone
            _, alone = _run(params, cfg, alone, [(decodes[i - 3][0][:-1], 0, blocks)])
        want, _ = _run(params, cfg, alone, [(toks, start, blocks)], num_tokens=32, num_reqs=1)
        err = np.abs(got[row] - want[0]).max() / np.abs(want[0]).max()
        assert err < 1e-5, (i, err)


def test_decode_equals_full_prefill():
    """Incremental decoding through the pages equals recomputing the whole prefix."""
    cfg = get_config("tiny-llama")
    params = init_params(cfg, seed=2)
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, 20).tolist()
    blocks = [7, 3, 9, 1, 12]
    cache = init_kv_cache(cfg, NUM_PAGES, PAGE)
    _, cache = _run(params, cfg, cache, [(toks[:10], 0, blocks)])
    for n in range(10, 20):
        inc, cache = _run(params, cfg, cache, [(toks[n : n + 1], n, blocks)])
        full, _ = _run(
            params, cfg, init_kv_cache(cfg, NUM_PAGES, PAGE), [(toks[: n + 1], 0, blocks)]
        )
        np.testing.assert_allclose(inc, full, rtol=0, atol=1e-5 * np.abs(full).max())


def test_padding_rows_do_not_touch_real_pages():
    """Padding tokens write only to the null page 0."""
    cfg = get_config("tiny-gpt")
    params = init_params(cfg)
    cache = init_kv_cache(cfg, 8, PAGE)
    _, cache = _run(params, cfg, cache, [([1, 2, 3], 0, [5])], num_tokens=16, num_reqs=4)
    k = np.asarray(cache.k)
    touched = sorted(set(np.nonzero(np.abs(k).sum(axis=(0, 1, 3, 4)))[0].tolist()))
    assert touched == [0, 5]
    assert jax.tree.all(jax.tree.map(lambda a: bool(np.isfinite(a).all()), cache))
