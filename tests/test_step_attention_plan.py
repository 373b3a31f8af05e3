"""The step's attention plumbing: the kernel's tile tables built once per step (not per
layer), and the kernel storing the step's K/V itself (`attention_options` fuse_kv_write)
giving the step with scatters' logits and cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parallel_utils import NUM_PAGES, PAGE, mixed_batches

from models import get_config, init_kv_cache, init_params, pack_batch, step
from models.decoder import forward


def _two_steps(cfg, params, batches):
    cache = init_kv_cache(cfg, NUM_PAGES, PAGE)
    logits = []
    for b in batches:
        out, cache = step(params, cache, b, cfg)
        logits.append(np.asarray(out)[: int(b.num_reqs)])
    return logits, cache


@pytest.mark.parametrize(
    "name,kv_cache_dtype,unroll",
    [("tiny-gpt", "auto", None), ("tiny-llama", "auto", 2), ("tiny-llama", "fp8", None)],
)
def test_fused_kv_write_step_matches_scatter_step(name, kv_cache_dtype, unroll):
    """Same cache (bit for bit outside the null page, which only scatters of padding touch)
    and the same logits as the kernel behind two scatters, and as the jnp reference."""
    base = get_config(
        name, attention_impl="pallas", kv_cache_dtype=kv_cache_dtype, layer_unroll=unroll
    )
    fused = base.replace(attention_options={"fuse_kv_write": True})
    params = init_params(base, seed=3)
    batches = mixed_batches(base, np.random.default_rng(1))
    want, want_cache = _two_steps(base, params, batches)
    got, got_cache = _two_steps(fused, params, batches)
    ref, _ = _two_steps(base.replace(attention_impl="reference"), params, batches)
    for g, w, r in zip(got, want, ref, strict=True):
        assert np.abs(g - w).max() / np.abs(w).max() < 1e-5
        assert np.abs(g - r).max() / np.abs(r).max() < 1e-4
    for g, w in ((got_cache.k, want_cache.k), (got_cache.v, want_cache.v)):
        g, w = np.asarray(g)[:, :, 1:], np.asarray(w)[:, :, 1:]  # page 0 aside
        # Layer 0's K/V come from the same embeddings: the same bits. Deeper layers' inputs
        # went through attention, whose sums run in another order when the new keys come
        # from registers: equal to rounding (fp8: at most a few values one step apart).
        np.testing.assert_array_equal(g[0], w[0])
        if g.dtype == np.uint8:
            fp8 = jnp.float8_e4m3fn
            assert (g != w).mean() < 0.01
            g, w = (np.asarray(jnp.asarray(x).view(fp8), np.float32) for x in (g, w))
            np.testing.assert_allclose(g, w, rtol=0.13, atol=2e-3)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    # no scatter left in the step: the kernel's pallas_call writes the pages
    jaxpr = str(jax.make_jaxpr(forward, static_argnums=3)(params, got_cache, batches[1], fused))
    assert "scatter" not in jaxpr and "_write" in jaxpr


def _walk(eqns, into_kernels: bool = True):
    """Equations, and those of the jaxprs nested in them (scan bodies, pjit, branches; and
    Pallas kernels' bodies unless not `into_kernels`)."""
    for eqn in eqns:
        yield eqn
        if eqn.primitive.name == "pallas_call" and not into_kernels:
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr, or a Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _walk(inner.eqns, into_kernels)


def _layer_launches(params, cache, batch, cfg) -> int:
    """Pallas kernels the step launches in one layer (the scan body over layers)."""
    closed = jax.make_jaxpr(forward, static_argnums=3)(params, cache, batch, cfg)
    (scan,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "scan"]
    eqns = _walk(scan.params["jaxpr"].jaxpr.eqns, into_kernels=False)
    return sum(e.primitive.name == "pallas_call" for e in eqns)


def _assert_reference_logits(cfg, ref_cfg, params, batches):
    """Two steps under `cfg` give `ref_cfg`'s logits (max error relative to max logit)."""
    got, _ = _two_steps(cfg, params, batches)
    ref, _ = _two_steps(ref_cfg, params, batches)
    for g, r in zip(got, ref, strict=True):
        assert np.abs(g - r).max() / np.abs(r).max() < 1e-4


@pytest.mark.parametrize("one_launch", [False, True])
def test_tile_tables_are_built_once_per_step(one_launch):
    """The tile-building cumsum (one per tile class) sits outside the scan over layers, so a
    GPU runs its kernels once a step rather than once a layer."""
    cfg = get_config(
        "tiny-gpt", attention_impl="pallas", attention_options={"one_launch": one_launch}
    )
    params = init_params(cfg)
    batch = mixed_batches(cfg, np.random.default_rng(0))[1]
    cache = init_kv_cache(cfg, NUM_PAGES, PAGE)
    closed = jax.make_jaxpr(forward, static_argnums=3)(params, cache, batch, cfg)
    (scan,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "scan"]
    body = [e.primitive.name for e in _walk(scan.params["jaxpr"].jaxpr.eqns)]
    assert "pallas_call" in body and "cumsum" not in body
    outside = [e for e in closed.jaxpr.eqns if e.primitive.name != "scan"]
    names = [e.primitive.name for e in _walk(outside)]
    assert names.count("cumsum") == 2  # the decode-tile and the prefill-tile tables


def test_one_tile_class_is_one_launch_a_layer_and_matches_reference():
    """attention_options prefill_rows=16 (= decode_rows): prefill chunks take 16-row tiles
    too, so a layer launches the kernel once (not twice, the second launch empty whenever
    the batch is all decodes), and the step still gives the reference's logits over prefill
    chunks of 20 and 33 tokens and decodes."""
    base = get_config("tiny-gpt", attention_impl="pallas")
    one = base.replace(attention_options={"prefill_rows": 16})
    params = init_params(base, seed=2)
    batches = mixed_batches(base, np.random.default_rng(4))
    cache = init_kv_cache(base, NUM_PAGES, PAGE)

    launches = [_layer_launches(params, cache, batches[0], cfg) for cfg in (base, one)]
    assert launches == [2, 1]
    _assert_reference_logits(one, base.replace(attention_impl="reference"), params, batches)


def test_decode_one_class_is_one_launch_in_decode_like_buckets():
    """attention_options decode_one_class: a decode-like bucket (32 tokens, 16 request rows)
    holding a 20-token prefill chunk and three decodes launches the kernel once a layer and
    gives the reference's logits; a prefill-heavy bucket (64 tokens, 8 rows) keeps two."""
    base = get_config("tiny-gpt", attention_impl="pallas")
    cfg = base.replace(attention_options={"decode_one_class": True})
    params = init_params(base, seed=6)
    rng = np.random.default_rng(8)
    first, mixed = mixed_batches(base, rng)
    decodes = [([int(rng.integers(base.vocab_size))], n, b) for n, b in ((20, [1, 2]), (7, [3]))]
    prefill = (rng.integers(0, base.vocab_size, 20).tolist(), 0, [10, 11])
    decode_like = pack_batch(
        [prefill, *decodes], page_size=PAGE, num_tokens=32, num_reqs=16, max_blocks=4
    )
    cache = init_kv_cache(base, NUM_PAGES, PAGE)

    launches = [_layer_launches(params, cache, b, cfg) for b in (decode_like, mixed)]
    assert launches == [1, 2]
    ref = base.replace(attention_impl="reference")
    _assert_reference_logits(cfg, ref, params, [first, decode_like])


def test_llm_takes_attention_options():
    """`LLM(attention_options=...)` (the CLI's --attention_options) reaches the step: the
    kernel writing K/V itself, both tile classes in one launch, serves the same greedy
    tokens as the jnp reference attention."""
    from orca_jax import LLM, SamplingParams

    cfg = get_config("tiny-gpt")
    params = init_params(cfg, seed=4)
    kw = dict(params=params, warmup=False, max_batch_size=4, block_size=16, max_model_len=64)
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], list(range(20, 40))]
    fused = LLM(
        config=cfg.replace(attention_impl="pallas"),
        attention_options="fuse_kv_write=true,one_launch=true",
        **kw,
    )
    options = dict(fused.engine.model_config.attention_options)
    assert options == {"fuse_kv_write": True, "one_launch": True}
    got = [o.token_ids for o in fused.generate(prompts, sp, use_tqdm=False)]
    ref = LLM(config=cfg.replace(attention_impl="reference"), **kw)
    assert got == [o.token_ids for o in ref.generate(prompts, sp, use_tqdm=False)]


@pytest.mark.parametrize("name,unroll", [("tiny-gpt", None), ("tiny-llama", 2)])
def test_fused_add_norm_step_matches_xla_ops(name, unroll):
    """`fused_add_norm`: every residual add and its norm as one Pallas kernel (LayerNorm for
    GPT-2, RMSNorm for Llama), same logits as XLA's ops; the layer body holds two."""
    base = get_config(name, layer_unroll=unroll)
    fused = base.replace(fused_add_norm=True)
    params = init_params(base, seed=6)
    batches = mixed_batches(base, np.random.default_rng(2))
    want, _ = _two_steps(base, params, batches)
    got, _ = _two_steps(fused, params, batches)
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w).max() / np.abs(w).max() < 1e-5
    cache = init_kv_cache(base, NUM_PAGES, PAGE)
    jaxpr = jax.make_jaxpr(forward, static_argnums=3)(params, cache, batches[1], fused)
    kind = "layer" if base.norm == "layernorm" else "rms"
    calls = [
        e
        for e in _walk(jaxpr.jaxpr.eqns)
        if str(e.params.get("name", "")).startswith(f"add_{kind}norm")
    ]
    assert len(calls) == 2  # the scan body's (unrolling happens when lowered)
    for call in calls:  # the stacked [L, D] norm params go in whole: no per-layer slice
        assert call.invars[3].aval.shape == (base.n_layers, base.d_model)
