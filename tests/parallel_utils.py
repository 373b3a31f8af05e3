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
    return [tokens for tokens, _ in greedy_outputs(engine, prompts, max_tokens)]


def greedy_outputs(
    engine: Engine, prompts: list[list[int]], max_tokens: int
) -> list[tuple[list[int], list[float]]]:
    """Every prompt run to `max_tokens` greedy tokens, every other one scoring its prompt
    (so steps carry prompt targets too): per prompt in order, (token ids, the log-probability
    of each prompt token after the first, or [] unscored)."""
    ids = [
        engine.add_request(
            p,
            SamplingParams(
                max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=0 if i % 2 else None
            ),
        )
        for i, p in enumerate(prompts)
    ]
    done = {}
    while engine.has_unfinished_requests():
        done |= {o.request_id: o for o in engine.step() if o.finished}
    return [(list(done[i].token_ids), _scores(done[i])) for i in ids]


def _scores(out) -> list[float]:
    if out.prompt_logprobs is None:
        return []
    pairs = zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:], strict=True)
    return [e[t].logprob for t, e in pairs]


def assert_same_outputs(got, want, atol: float = 1e-5) -> None:
    """`greedy_outputs` of two engines: equal tokens, prompt scores within `atol`."""
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=atol)


def engine_matches_one_device(cfg: ModelConfig, seed: int, parallel_kw: dict, **kw) -> Engine:
    """Random prompts through a warmed-up engine spread by `parallel_kw` give one device's
    greedy tokens, and compile nothing; returns the spread engine for further checks."""
    params = init_params(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, cfg.vocab_size, int(n)).tolist() for n in (3, 17, 30, 9, 1, 22)]
    kw = dict(max_batch_size=4, block_size=16, num_kv_blocks=40, max_model_len=64) | kw
    one = greedy_outputs(Engine(cfg, params, None, EngineConfig(**kw, warmup=False)), prompts, 10)
    engine = Engine(cfg, params, None, EngineConfig(**kw, **parallel_kw, warmup=True))
    with count_compiles() as compiles:
        spread = greedy_outputs(engine, prompts, 10)
    assert_same_outputs(spread, one)
    assert (compiles.traces, compiles.compiles) == (0, 0)
    return engine
