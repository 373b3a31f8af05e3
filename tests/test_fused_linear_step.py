"""The step with every linear layer as the Pallas kernel (`ModelConfig.fused_linear`): what
runs where, and what falls back to XLA's ops. (Its logits against transformers' GPT-2 and
Llama are in tests/test_reference_*.py.)"""

import jax
import numpy as np
import pytest
from parallel_utils import NUM_PAGES, PAGE, mixed_batches
from test_step_attention_plan import _two_steps, _walk

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


def _linear_calls(cfg, params, batch):
    cache = init_kv_cache(cfg, NUM_PAGES, PAGE)
    closed = jax.make_jaxpr(forward, static_argnums=3)(params, cache, batch, cfg)
    (scan,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "scan"]
    body = list(_walk(scan.params["jaxpr"].jaxpr.eqns, into_kernels=False))
    calls = [
        e
        for e in body
        if e.primitive.name == "pallas_call" and str(e.params["name"]).startswith("linear")
    ]
    dots = [e for e in body if e.primitive.name == "dot_general"]
    return calls, dots


def _kind(call) -> str:
    """What a launch fuses, from its name: "linear_bias_x3_m64n16k64" -> "bias_x3",
    "linear_m64n64k64s4" -> "s4" (biases, activation, products, K splits)."""
    name = str(call.params["name"]).removeprefix("linear")
    head, blocks = name.rsplit("_m", 1)
    split = "s" in blocks and "s" + blocks.split("s")[1]
    return "_".join(filter(None, [head.removeprefix("_"), split]))


@pytest.mark.parametrize(
    "name,unroll,d_ff,launches",
    [
        ("tiny-gpt", None, None, ["bias_x3", "bias", "bias_gelu_tanh", "bias"]),
        ("tiny-llama", 2, None, ["x3", "", "", "", ""]),  # o, gate, up, down plain
        # a long K loop (down: K = 2048) split 4 ways: f32 partials summed by XLA
        ("tiny-gpt", None, 2048, ["bias_x3", "bias", "bias_gelu_tanh", "bias_s4"]),
    ],
)
def test_every_linear_layer_is_one_kernel_over_the_stacked_weights(name, unroll, d_ff, launches):
    """GPT-2: q, k and v in one launch, then o, up (GELU fused), down; Llama: q/k/v, o,
    gate, up, down. Each call takes the whole stacked [L, K, N] kernels and the layer index,
    and no XLA dot is left in the layer body; the logits are XLA's to rounding (f32)."""
    base = get_config(name, layer_unroll=unroll, attention_impl="pallas")  # no jnp attention
    base = base.replace(d_ff=d_ff or base.d_ff)
    fused = base.replace(fused_linear=True)
    params = _with_random_biases(init_params(base, seed=5), 0)
    batches = mixed_batches(base, np.random.default_rng(3))
    calls, dots = _linear_calls(fused, params, batches[1])
    assert not dots
    assert sorted(map(_kind, calls)) == sorted(launches)
    for call in calls:
        w = call.invars[2].aval
        assert w.ndim == 3 and w.shape[0] == base.n_layers
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
    assert sorted(map(_kind, calls)) == ["bias", "bias_x3"] and len(dots) == 2
