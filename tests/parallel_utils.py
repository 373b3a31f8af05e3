"""Shared pieces of the tensor- and pipeline-parallel tests."""

import numpy as np

from models import ModelConfig, get_config, init_params, pack_batch
from orca_jax import Engine, EngineConfig, SamplingParams
from orca_jax.utils.compilation import count_compiles

PAGE, NUM_PAGES = 16, 24
# The multi-process test's model, prompts and engine (both processes and the parent agree).
MODEL = get_config("tiny-gpt")
SEED = 21
PROMPTS = [np.random.default_rng(SEED).integers(0, 256, n).tolist() for n in (3, 17, 30, 9, 1, 22)]
ENGINE_KW = dict(
    policy="paged", max_batch_size=4, block_size=16, num_kv_blocks=40, max_model_len=64
)


def mixed_batches(cfg: ModelConfig, rng: np.random.Generator):
    """Two prefills and three decodes (the decodes' contexts cached by a first batch)."""
    ctx = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (20, 7, 33)]
    blocks = [[1, 2], [3], [4, 5, 6]]
    pack = dict(page_size=PAGE, num_tokens=64, num_reqs=8, max_blocks=4)
    first = pack_batch([(t, 0, b) for t, b in zip(ctx, blocks, strict=True)], **pack)
    prefills = [
        (rng.integers(0, cfg.vocab_size, n).tolist(), 0, b) for n, b in ((11, [7]), (18, [8, 9]))
    ]
    decodes = [
        ([int(rng.integers(cfg.vocab_size))], len(t), b) for t, b in zip(ctx, blocks, strict=True)
    ]
    return first, pack_batch(prefills + decodes, **pack)


def greedy_tokens(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Every prompt run to `max_tokens` greedy tokens; token ids in prompt order."""
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(p, sp) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        done |= {o.request_id: list(o.token_ids) for o in engine.step() if o.finished}
    return [done[i] for i in ids]


def engine_matches_one_device(cfg: ModelConfig, seed: int, parallel_kw: dict, **kw) -> Engine:
    """Random prompts through a warmed-up engine spread by `parallel_kw` give one device's
    greedy tokens, and compile nothing; returns the spread engine for further checks."""
    params = init_params(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, cfg.vocab_size, int(n)).tolist() for n in (3, 17, 30, 9, 1, 22)]
    kw = dict(max_batch_size=4, block_size=16, num_kv_blocks=40, max_model_len=64) | kw
    one = greedy_tokens(Engine(cfg, params, None, EngineConfig(**kw, warmup=False)), prompts, 10)
    engine = Engine(cfg, params, None, EngineConfig(**kw, **parallel_kw, warmup=True))
    with count_compiles() as compiles:
        spread = greedy_tokens(engine, prompts, 10)
    assert spread == one
    assert (compiles.traces, compiles.compiles) == (0, 0)
    return engine
