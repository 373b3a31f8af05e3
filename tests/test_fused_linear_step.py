"""The step with every linear layer as the Pallas kernel (`ModelConfig.fused_linear`): what
runs where, and what falls back to XLA's ops. (Its logits against transformers' GPT-2 and
Llama are in tests/test_reference_*.py.)"""

import jax
import numpy as np
import pytest
from parallel_utils import NUM_PAGES, PAGE, mixed_batches
from test_step_attention_plan import _two_steps

from models import get_config, init_kv_cache, init_params
from models.decoder import forward


def _with_random_biases(params, seed):
    """init_params draws zero biases; these make the fused bias add count."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        if jax.tree_util.keystr(path[-1:]) == "['bias']":
            return (0.1 * rng.standard_normal(a.shape)).astype(a.dtype)
        return a

    return jax.tree_util.tree_map_with_path(draw, params)


def _walk(eqns):
    """Equations, and those of the jaxprs nested in them, but not inside Pallas kernels."""
    for eqn in eqns:
        yield eqn
        if eqn.primitive.name == "pallas_call":
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _walk(inner.eqns)


def _linear_calls(cfg, params, batch):
    cache = init_kv_cache(cfg, NUM_PAGES, PAGE)
    closed = jax.make_jaxpr(forward, static_argnums=3)(params, cache, batch, cfg)
    (scan,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "scan"]
    body = list(_walk(scan.params["jaxpr"].jaxpr.eqns))
    calls = [
        e
        for e in body
        if e.primitive.name == "pallas_call" and str(e.params["name"]).startswith("linear")
    ]
    dots = [e for e in body if e.primitive.name == "dot_general"]
    return calls, dots


@pytest.mark.parametrize("name,unroll,per_layer", [("tiny-gpt", None, 6), ("tiny-llama", 2, 7)])
def test_every_linear_layer_is_one_kernel_over_the_stacked_weights(name, unroll, per_layer):
    """GPT-2: q, k, v, o, up (GELU fused), down; Llama: q, k, v, o, gate, up, down. Each call
    takes the whole stacked [L, K, N] kernel and the layer index, and no XLA dot is left in
    the layer body; the logits are XLA's to rounding (f32)."""
    base = get_config(name, layer_unroll=unroll, attention_impl="pallas")  # no jnp attention
    fused = base.replace(fused_linear=True)
    params = _with_random_biases(init_params(base, seed=5), 0)
    batches = mixed_batches(base, np.random.default_rng(3))
    calls, dots = _linear_calls(fused, params, batches[1])
    assert len(calls) == per_layer and not dots
    for call in calls:
        w = call.invars[2].aval
        assert w.ndim == 3 and w.shape[0] == base.n_layers
    acts = sorted(str(c.params["name"]).split("_m")[0] for c in calls)
    if name == "tiny-gpt":  # every GPT-2 linear has a bias; only the up projection a GELU
        assert acts == ["linear_bias"] * 5 + ["linear_bias_gelu_tanh"]
    want, _ = _two_steps(base, params, batches)
    got, _ = _two_steps(fused, params, batches)
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w).max() / np.abs(w).max() < 1e-5


def test_what_falls_back_to_xla():
    """int8 weights, and widths the kernel's 16-wide blocks do not divide, run XLA's ops."""
    cfg = get_config("tiny-gpt", fused_linear=True, attention_impl="pallas")
    batch = mixed_batches(cfg, np.random.default_rng(0))[1]
    int8 = cfg.replace(quantization="int8")
    calls, dots = _linear_calls(int8, init_params(int8), batch)
    assert not calls and len(dots) == 6
    odd = cfg.replace(d_ff=72)  # up's N and down's K are 72
    calls, dots = _linear_calls(odd, init_params(odd), batch)
    assert len(calls) == 4 and len(dots) == 2
