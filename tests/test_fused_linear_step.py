"""The step with every linear layer as the Pallas kernel (`ModelConfig.fused_linear`): what
runs where, and what falls back to XLA's ops. (Its logits against transformers' GPT-2 and
Llama are in tests/test_reference_*.py.)"""

import dataclasses

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
    # XLA's norms, and its rotary embedding
    norms = [e for e in body if e.primitive.name in ("rsqrt", "cos")]
    return calls, dots, norms


def _kind(call) -> str:
    """What a launch fuses, from its name: "linear_bias_x3_m64n16k64" -> "bias_x3",
    "linear_m64n64k64s4" -> "s4" (biases, activation, products, K splits)."""
    name = str(call.params["name"]).removeprefix("linear")
    head, blocks = name.rsplit("_m", 1)
    split = "s" in blocks and "s" + blocks.split("s")[1]
    return "_".join(filter(None, [head.removeprefix("_"), split]))


@pytest.mark.parametrize(
    "name,unroll,changes,launches",
    [
        (
            "tiny-gpt",
            None,
            {},
            ["layernorm_bias_x3", "bias_residual", "layernorm_bias_gelu_tanh", "bias_residual"],
        ),
        # heads of 32: q and k rotated in their launch
        (
            "tiny-llama",
            2,
            dict(head_dim=32),
            ["rmsnorm_rope_x3", "residual", "rmsnorm_silu_gated", "residual"],
        ),
        # heads of 16, too narrow for the kernel's rope: XLA's after the launch
        ("tiny-llama", 2, {}, ["rmsnorm_x3", "residual", "rmsnorm_silu_gated", "residual"]),
        # a long K loop (down: K = 2048) split 4 ways: f32 partials summed by XLA
        (
            "tiny-gpt",
            None,
            dict(d_ff=2048),
            ["layernorm_bias_x3", "bias_residual", "layernorm_bias_gelu_tanh", "bias_residual_s4"],
        ),
    ],
)
def test_every_linear_layer_is_one_kernel_over_the_stacked_weights(name, unroll, changes, launches):
    """GPT-2: the norm with q, k and v in one launch, then o with the residual add, the norm
    with up (GELU fused), down with the residual add; Llama: the same with gate and up in
    one launch. Each call takes the whole stacked [L, K, N] kernels and the layer index,
    and no XLA dot or norm is left in the layer body; the logits are XLA's to rounding (f32)."""
    base = get_config(name, layer_unroll=unroll, attention_impl="pallas")  # no jnp attention
    base = base.replace(**changes)
    fused = base.replace(fused_linear=True)
    params = _with_random_biases(init_params(base, seed=5), 0)
    batches = mixed_batches(base, np.random.default_rng(3))
    calls, dots, norms = _linear_calls(fused, params, batches[1])
    xla_rope = base.position == "rope" and base.head_dim < 32
    assert not dots and [e.primitive.name for e in norms] == ["cos"] * (2 * xla_rope)
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
    calls, dots, norms = _linear_calls(int8, init_params(int8), batch)
    assert not calls and len(dots) == 6 and len(norms) == 2
    odd = cfg.replace(d_ff=72)  # up's N and down's K are 72: XLA's norm before up
    calls, dots, norms = _linear_calls(odd, init_params(odd), batch)
    assert sorted(map(_kind, calls)) == ["bias_residual", "layernorm_bias_x3"]
    assert len(dots) == 2 and len(norms) == 1


@pytest.mark.parametrize(
    "name,adapted,want",
    [
        # k+v, o, up
        ("tiny-gpt", ("q", "down"), ["bias_x2", "bias_residual", "layernorm_bias_gelu_tanh"]),
        # k+v, o, silu(gate) * up
        ("tiny-llama", ("q", "down"), ["rope_x2", "residual", "rmsnorm_silu_gated"]),
        # q+k+v, o, gate alone (XLA gates it with the adapted up), down
        ("tiny-llama", ("up",), ["rmsnorm_rope_x3", "residual", "", "residual"]),
    ],
)
def test_adapted_projections_take_xla_ops_the_rest_stay_fused(name, adapted, want):
    """LoRA on some projections: those (and the norm before them, the residual add after
    down) run XLA's ops with the adapter; the rest of their launch keeps the kernel on the
    normed x (k and v without q; gate without up, gated by XLA after), and so do the other
    launches with their norm and residual add. Logits: the XLA step's."""
    base = get_config(name, attention_impl="pallas")
    if base.position == "rope":
        base = base.replace(head_dim=32)  # heads the kernel rotates
    fused = base.replace(fused_linear=True)
    params = _with_random_biases(init_params(base, seed=2), 1)
    rng = np.random.default_rng(4)
    dims = {
        "q": (base.d_model, base.n_heads * base.head_dim),
        "up": (base.d_model, base.d_ff),
        "down": (base.d_ff, base.d_model),
    }
    dims = {n: dims[n] for n in adapted}
    params["layers"]["lora"] = {
        n: {
            "a": (0.3 * rng.standard_normal((base.n_layers, 2, d_in, 4))).astype(np.float32),
            "b": (0.3 * rng.standard_normal((base.n_layers, 2, 4, d_out))).astype(np.float32),
        }
        for n, (d_in, d_out) in dims.items()
    }
    batches = [
        dataclasses.replace(b, lora_slots=np.arange(b.input_ids.shape[0], dtype=np.int32) % 3 - 1)
        for b in mixed_batches(base, np.random.default_rng(3))
    ]
    calls, dots, norms = _linear_calls(fused, params, batches[1])
    assert sorted(map(_kind, calls)) == sorted(want)
    # the adapted launch's norm (and, q adapted, XLA's rope of q)
    assert len(norms) == 1 + (base.position == "rope" and "q" in adapted)
    got, _ = _two_steps(fused, params, batches)
    plain, _ = _two_steps(base, params, batches)
    without, _ = _two_steps(base, {**params, "layers": _no_lora(params["layers"])}, batches)
    for g, w, wo in zip(got, plain, without, strict=True):
        assert np.abs(g - w).max() / np.abs(w).max() < 1e-5
        assert np.abs(wo - w).max() / np.abs(w).max() > 1e-3  # the adapters count


def _no_lora(layers):
    return {k: v for k, v in layers.items() if k != "lora"}
