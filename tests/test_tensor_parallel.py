"""Tensor parallelism over the 8 fake CPU devices: same logits and tokens as one device."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from parallel_utils import NUM_PAGES, PAGE, engine_matches_one_device, mixed_batches

from models import get_config, init_kv_cache, init_params, param_shapes, step
from orca_jax import EngineConfig
from sharding import make_mesh, param_specs, shard_kv_cache, shard_params


def _two_steps(params, cache, batches, cfg, mesh=None):
    out = []
    for b in batches:
        logits, cache = step(params, cache, b, cfg, mesh)
        out.append(np.asarray(logits)[: int(b.num_reqs)])
    return out, cache


@pytest.mark.parametrize(
    "name,impl,tp",
    [
        ("tiny-gpt", "reference", 2),
        ("tiny-gpt", "reference", 4),
        ("tiny-llama", "reference", 2),
        ("tiny-llama", "pallas", 2),
        ("tiny-llama", "pallas_fused", 2),  # the kernel stores K/V into its shard's pages
        ("tiny-llama", "fp8", 2),  # reference attention over an fp8 cache
    ],
)
def test_sharded_step_matches_one_device(name, impl, tp):
    fp8, fused = impl == "fp8", impl == "pallas_fused"
    cfg = get_config(
        name,
        attention_impl={"fp8": "reference", "pallas_fused": "pallas"}.get(impl, impl),
        kv_cache_dtype="fp8" if fp8 else "auto",
        attention_options={"fuse_kv_write": fused},
    )
    params = init_params(cfg, seed=5)
    batches = mixed_batches(cfg, np.random.default_rng(tp))
    want, _ = _two_steps(params, init_kv_cache(cfg, NUM_PAGES, PAGE), batches, cfg)

    mesh = make_mesh(tp)
    sparams = shard_params(params, cfg, mesh)
    q = sparams["layers"]["q"]["kernel"]  # [L, D, N, H]: each device holds N / tp heads
    assert {s.data.shape[2] for s in q.addressable_shards} == {cfg.n_heads // tp}
    cache = shard_kv_cache(init_kv_cache(cfg, NUM_PAGES, PAGE), mesh)
    got, cache = _two_steps(sparams, cache, batches, cfg, mesh)

    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w).max() / np.abs(w).max() < 1e-5
    # The cache stays split by KV head across steps, and the step moves no weights or pages:
    # its only collectives are the all-reduces after the row-parallel projections.
    assert cache.k.sharding.spec == P(None, "model")
    assert {s.data.shape[1] for s in cache.k.addressable_shards} == {cfg.n_kv_heads // tp}
    args = (sparams, cache, batches[1], cfg, mesh)
    # Attention runs per head shard (on a GPU a Pallas call outside shard_map would run whole
    # on every device).
    assert "shard_map" in str(jax.make_jaxpr(step, static_argnums=(3, 4))(*args))
    hlo = step.lower(*args).compile().as_text()
    ops = set(re.findall(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all)\b", hlo))
    assert ops == {"all-reduce"}, ops


def test_rules_on_gpt2_shapes():
    """GPT-2's 50257-token vocabulary does not split in two: embeddings stay whole."""
    cfg = get_config("gpt2")
    specs = param_specs(param_shapes(cfg), cfg, 2)
    assert specs["embed"]["tokens"] == P()
    assert specs["embed"]["positions"] == P()
    assert specs["layers"]["q"]["kernel"] == P(None, None, "model", None)
    assert specs["layers"]["o"]["kernel"] == P(None, "model", None, None)
    assert specs["layers"]["mlp"]["down"]["kernel"] == P(None, "model", None)
    assert specs["layers"]["attn_norm"]["scale"] == P()
    smol = get_config("smollm2-135m")  # 49152 = 2^14 * 3 splits
    assert param_specs(param_shapes(smol), smol, 3)["embed"]["tokens"] == P("model", None)


@pytest.mark.parametrize(
    "name,tp,match",
    [("tiny-gpt", 3, "n_heads=4"), ("tiny-llama", 4, "n_kv_heads=2"), ("tiny-gpt", 0, ">= 1")],
)
def test_bad_split_is_a_clear_error(name, tp, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(tensor_parallel_size=tp, num_kv_blocks=16).resolve(get_config(name))


def test_too_many_devices_is_a_clear_error():
    with pytest.raises(ValueError, match="needs that many devices"):
        make_mesh(len(jax.devices()) + 1)


def test_engine_tokens_with_two_devices():
    """Greedy tokens with tensor_parallel_size=2 equal one device's; warm, it compiles nothing."""
    engine = engine_matches_one_device(
        get_config("tiny-llama"),
        seed=7,
        parallel_kw=dict(tensor_parallel_size=2),
        policy="paged",
        max_num_batched_tokens=32,
    )
    assert engine.runner.kv_cache.k.sharding.spec == P(None, "model")
