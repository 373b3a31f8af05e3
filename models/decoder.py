"""The decoder: parameters, and one forward step over a packed ragged batch.

Legend: T tokens, R requests, D model, N heads, K kv heads, H head dim, F ffn, V vocab,
L layers, P pages, S page size. Layers are stacked on a leading L axis and scanned, so
compile time does not grow with depth (unless `ModelConfig.layer_unroll` unrolls the scan).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from models.attention import plan_attention, write_and_attend
from models.batch import RaggedBatch
from models.config import ModelConfig
from models.kv_cache import KVCache
from models.layers import SPECS, Params, dense, mlp, norm, rope
from models.lora import lora_delta
from models.quantize import quantize_params
from pallas_kernels.linear.reference import activate

# Layers per scan iteration when `ModelConfig.layer_unroll` is None, per backend ("all":
# every layer, no loop). CPU: 1 (one compiled layer body; the loop costs nothing next to a
# CPU layer). GPU: all (NVIDIA H200, 2026-12-04, gpt2 bf16 decode step 128 x 512: queued
# 1.294 ms against 1.582 scanned, waited for 2.014 against 2.196; the scanned loop copies
# each layer's weights out of the stacked arrays for XLA's GEMMs). Compile time grows with
# depth.
AUTO_LAYER_UNROLL: dict[str, int | str] = {"cpu": 1, "gpu": "all"}
# Whether `ModelConfig.fused_add_norm=None` fuses each residual add with the norm after it
# (one Pallas kernel instead of two XLA kernels). Off: on the H200 the gpt2 step was not
# faster with it (1.309 ms against 1.280 queued; the bias adds before it stay XLA kernels).
AUTO_FUSED_ADD_NORM = {"cpu": False, "gpu": False}
# Whether `ModelConfig.fused_linear=None` runs a layer's linear work (with its biases,
# activation, norms and residual adds) as four Pallas launches over the stacked weights.
# Off: on the H200 the gpt2 step was slower with the first version (bias and activation
# only: 1.526 ms against 1.294 queued), its down projection (K = 3072) taking 19 us against
# XLA's 8 (experiments/bench_linear.py; RESULTS.md). The norms and adds in the kernel, and
# the split down projection, are not measured on a GPU yet.
AUTO_FUSED_LINEAR = {"cpu": False, "gpu": False}
ROPED = ("q", "k")  # the projections the rotary embedding rotates


def _params_of(p: Params, name: str) -> Params:
    """A layer's params `p` of projection `name` (each one's einsum: `layers.SPECS`)."""
    return p["mlp"][name] if name in ("gate", "up", "down") else p[name]


def _or_backend_default(value, defaults: dict, fallback):
    """A config field's value, or where it is None this backend's entry of `defaults`."""
    return defaults.get(jax.default_backend(), fallback) if value is None else value


def layer_unroll(config: ModelConfig) -> int:
    """Layers per iteration of the scan over layers: the config's, or the backend's default."""
    unroll = _or_backend_default(config.layer_unroll, AUTO_LAYER_UNROLL, 1)
    return config.n_layers if unroll == "all" else unroll


def _add_norm(config: ModelConfig, layers: Params, mesh: Mesh | None):
    """add_norm(x, delta, p, name, layer) -> (x + delta, the norm `name` of it): XLA's ops on
    the layer's params `p[name]`, or one kernel reading row `layer` of the stacked
    `layers[name]` (a row sliced out first would cost a copy kernel, as a kernel operand)."""
    fused = _or_backend_default(config.fused_add_norm, AUTO_FUSED_ADD_NORM, False)
    if not fused or mesh is not None:  # (sharded: XLA partitions its own ops)

        def add_norm(x, delta, p, name, layer):
            x = x + delta
            return x, norm(p[name], x, config)

        return add_norm
    from pallas_kernels.add_norm.kernel import add_norm as kernel

    def add_norm(x, delta, p, name, layer):
        stacked = layers[name]
        return kernel(
            x,
            delta,
            stacked["scale"],
            stacked.get("bias"),
            layer,
            eps=config.norm_eps,
            layernorm=config.norm == "layernorm",
        )

    return add_norm


def _kernel_rotates(config: ModelConfig) -> bool:
    """Whether the fused linear kernel can rotate this rope model's q and k (its column
    blocks must fit in half a head); where not, XLA's rope runs after the launch."""
    from pallas_kernels.linear.kernel import supports_rope

    return config.position == "rope" and supports_rope(config.head_dim)


def _fused_linear(config: ModelConfig, layers: Params, mesh: Mesh | None):
    """fused(names, h, layer, activation, norm, residual) -> outputs, or None: the Pallas
    linear kernel reading the stacked weights `layers[name]` (`layers["mlp"][name]` for the
    MLP's) at the layer, one launch for every name (they share h: a layer's q, k and v),
    where the config asks for it and the weights are plain (not int8) and unsharded.

    `norm` names the stacked norm params (`layers[norm]`) the kernel applies to h's rows
    first; `residual` [T, D] is added to the one output; `gated` (names = gate, up) makes
    the one output activation(gate) * up; `positions` [T] rotates q and k (rope) in the
    kernel (only where `_kernel_rotates`). So a layer is five launches: norm with q, k and
    v; attention; o with the residual add; norm with up (or with gate and up, gated); down
    with the residual add.

    Every spec of the decoder contracts all of h's axes after T with the weight's leading
    axes, so h flattens to [T, K], each stacked kernel to [L, K, N] and its bias to [L, N]."""
    fused = _or_backend_default(config.fused_linear, AUTO_FUSED_LINEAR, False)
    if not fused or mesh is not None or config.quantization is not None:
        return None
    from pallas_kernels.linear.kernel import linear_group, supports

    def fused_linear(
        names, h, layer, activation=None, norm=None, residual=None, gated=False, positions=None
    ):
        stacks = [_params_of(layers, n) for n in names]
        outs = [st["kernel"].shape[h.ndim :] for st in stacks]  # kernels: [L, *h.shape[1:], *out]
        K, Ns = h[0].size, [math.prod(out) for out in outs]
        if not all(supports(K, N, h.dtype) for N in Ns):
            return None
        ys = linear_group(
            h.reshape(h.shape[0], K),
            [st["kernel"].reshape(-1, K, N) for st, N in zip(stacks, Ns, strict=True)],
            [
                None if "bias" not in st else st["bias"].reshape(-1, N)
                for st, N in zip(stacks, Ns, strict=True)
            ],
            layer,
            norm=norm and config.norm,
            norm_scale=norm and layers[norm]["scale"],
            norm_bias=norm and layers[norm].get("bias"),
            eps=config.norm_eps,
            residual=residual,
            activation=activation,
            gated=gated,
            rope=None if positions is None else tuple(n in ROPED for n in names),
            rope_theta=config.rope_theta,
            positions=positions,
            head_dim=config.head_dim,
        )
        outs = outs[:1] if gated else outs  # gated: one output, shaped as each product
        return [y.reshape(h.shape[0], *out) for y, out in zip(ys, outs, strict=True)]

    return fused_linear


def param_shapes(config: ModelConfig) -> Params:
    """The parameter tree as `jax.ShapeDtypeStruct`s (no memory), for planning and init."""
    D, N, K, H, F, L, V = (
        config.d_model,
        config.n_heads,
        config.n_kv_heads,
        config.head_dim,
        config.d_ff,
        config.n_layers,
        config.vocab_size,
    )
    dt = jnp.dtype(config.dtype)
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dt)

    def linear(in_shape, out_shape):
        p = {"kernel": s(L, *in_shape, *out_shape)}
        if config.use_bias:
            p["bias"] = s(L, *out_shape)
        return p

    def norm_p(*lead):
        p = {"scale": s(*lead, D)}
        if config.norm == "layernorm":
            p["bias"] = s(*lead, D)
        return p

    mlp_p = {"up": linear((D,), (F,)), "down": linear((F,), (D,))}
    if config.activation == "swiglu":
        mlp_p["gate"] = linear((D,), (F,))
    params = {
        "embed": {"tokens": s(V, D)},
        "layers": {
            "attn_norm": norm_p(L),
            "q": linear((D,), (N, H)),
            "k": linear((D,), (K, H)),
            "v": linear((D,), (K, H)),
            "o": linear((N, H), (D,)),
            "mlp_norm": norm_p(L),
            "mlp": mlp_p,
        },
        "final_norm": norm_p(),
    }
    if config.position == "learned":
        params["embed"]["positions"] = s(config.max_seq_len, D)
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": s(D, V)}
    if config.quantization:
        return jax.eval_shape(functools.partial(quantize_params, config=config), params)
    return params


@dataclasses.dataclass(frozen=True)
class RandomWeights:
    """Params still to be drawn (`init_params(config, seed)`), so that whoever places them
    can draw each device's slice where it lives instead of the whole tree on one device
    (`sharding.init_sharded`; the runner does this)."""

    seed: int = 0


def init_params(config: ModelConfig, seed: int = 0) -> Params:
    """Random weights (normal, std 0.02; norm scales 1, biases 0) of the config's shapes.

    Values depend only on (config, seed): traced under `jax.jit` with sharded outputs they
    come out the same (to rounding: jit fuses the scaling), each device drawing its slice."""
    if config.quantization is not None:  # drawn in float, then quantized
        return quantize_params(init_params(config.replace(quantization=None), seed), config)
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def init(path, sds, key):
        name = jax.tree_util.keystr(path[-1:])
        if "scale" in name:
            return jnp.ones(sds.shape, sds.dtype)
        if "bias" in name:
            return jnp.zeros(sds.shape, sds.dtype)
        return (0.02 * jax.random.normal(key, sds.shape, jnp.float32)).astype(sds.dtype)

    return treedef.unflatten([init(p, s, k) for (p, s), k in zip(leaves, keys, strict=True)])


def embed(params: Params, batch: RaggedBatch, config: ModelConfig) -> jax.Array:
    """Token (and learned position) embeddings of the packed tokens: [T, D]."""
    x = params["embed"]["tokens"][batch.input_ids]  # [T, D]
    if config.position == "learned":
        x = x + params["embed"]["positions"][batch.positions]
    return x


def decoder_layers(
    layers: Params,
    kv_cache: KVCache,
    x: jax.Array,  # [T, D]
    batch: RaggedBatch,
    config: ModelConfig,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, KVCache]:
    """The stacked layers `layers` (leading axis l) over x, with their l layers of cache."""
    sm_scale = config.head_dim**-0.5
    plan = plan_attention(batch, config, kv_cache.k.shape[3])  # once for every layer
    add_norm = _add_norm(config, layers, mesh)
    fused_linear = _fused_linear(config, layers, mesh)
    kernel_rope = fused_linear is not None and _kernel_rotates(config)

    def layer_step(carry, p):
        # delta: the last layer's MLP output, added to the residual stream here together
        # with this layer's first norm (vLLM's fused_add_rms_norm pattern); with the fused
        # linear kernel the layer adds its own (delta stays zero)
        x, delta, k_cache, v_cache, layer = carry
        # LoRA slots (models/lora.py), when the runner serves adapters and the batch says whose
        lora = p.get("lora") if batch.lora_slots is not None else None

        def fused(
            names, h, activation=None, norm_name=None, residual=None, gated=False, rope=False
        ):
            """The Pallas kernel's outputs, or None (XLA's ops then)."""
            if fused_linear is None or (lora is not None and any(n in lora for n in names)):
                return None
            positions = batch.positions if rope else None  # (rope: only if kernel_rope)
            return fused_linear(names, h, layer, activation, norm_name, residual, gated, positions)

        def linear(name, lp, h, spec, activation=None):
            if lora is None or name not in lora:
                y = fused((name,), h, activation)
                return dense(lp, h, spec, activation) if y is None else y[0]
            y = dense(lp, h, spec)
            extra = lora_delta(lora[name], h.reshape(h.shape[0], -1), batch.lora_slots)
            return activate(y + extra.reshape(y.shape), activation)

        def proj(names, h, activation=None, norm_name=None, residual=None, gated=False, rope=False):
            """activation(norm(h) @ w + b) (+ residual) for each name, or (gated: names =
            gate, up) the one output activation(gate) * up, with q and k rotated if `rope`:
            one kernel where it can, else XLA's norm, each `linear`, rope, the gating and
            the add."""
            in_kernel = rope and kernel_rope  # else XLA's rope of q and k after the launch
            ys = fused(names, h, activation, norm_name, residual, gated, in_kernel)
            if ys is not None:
                if rope and not in_kernel:
                    ys = [rope_at(y) if n in ROPED else y for n, y in zip(names, ys, strict=True)]
                return ys
            h = h if norm_name is None else norm(p[norm_name], h, config)
            each = None if gated else activation  # gated: applied to the gate below
            plain = [n for n in names if lora is None or n not in lora]  # still one launch
            got = fused(plain, h, each, rope=in_kernel) if plain else None
            ys = dict(zip(plain, got, strict=True)) if got else {}
            rotated = set(ys) if in_kernel else set()
            ys = [
                ys[n] if n in ys else linear(n, _params_of(p, n), h, SPECS[n], each) for n in names
            ]
            ys = [
                rope_at(y) if rope and n in ROPED and n not in rotated else y
                for n, y in zip(names, ys, strict=True)
            ]
            if gated:
                gate, up = ys
                ys = [activate(gate, activation) * up]
            return ys if residual is None else [residual + y for y in ys]

        def rope_at(y):  # y [T, heads, H] rotated at the batch's positions
            return rope(y, batch.positions, config.rope_theta)

        def attend(q, k, v, k_cache, v_cache, roped=False):  # [T, N, H], the caches written
            if config.position == "rope" and not roped:
                q, k = rope_at(q), rope_at(k)
            return write_and_attend(
                q, k, v, k_cache, v_cache, layer, batch, config, sm_scale, mesh, plan
            )

        if fused_linear is not None:  # five launches a layer (see _fused_linear)
            roped = config.position == "rope"  # q and k come out rotated
            q, k, v = proj(("q", "k", "v"), x, norm_name="attn_norm", rope=roped)
            attn, k_cache, v_cache = attend(q, k, v, k_cache, v_cache, roped)
            (x,) = proj(("o",), attn, residual=x)
            if config.activation == "swiglu":
                (h,) = proj(("gate", "up"), x, "silu", norm_name="mlp_norm", gated=True)
            else:
                (h,) = proj(("up",), x, "gelu_tanh", norm_name="mlp_norm")
            (x,) = proj(("down",), h, residual=x)
            return (x, delta, k_cache, v_cache, layer + 1), None

        x, h = add_norm(x, delta, p, "attn_norm", layer)  # [T, D] each
        # q [T, N, H], k and v [T, K, H]
        q, k, v = proj(("q", "k", "v"), h)
        attn, k_cache, v_cache = attend(q, k, v, k_cache, v_cache)
        x, h = add_norm(x, linear("o", p["o"], attn, SPECS["o"]), p, "mlp_norm", layer)
        delta = mlp(p["mlp"], h, config, linear)  # [T, D]
        return (x, delta, k_cache, v_cache, layer + 1), None

    init = (x, jnp.zeros_like(x), kv_cache.k, kv_cache.v, jnp.int32(0))
    (x, delta, k_cache, v_cache, _), _ = jax.lax.scan(
        layer_step, init, layers, unroll=layer_unroll(config)
    )
    return (x if fused_linear is not None else x + delta), KVCache(k=k_cache, v=v_cache)


def logits_of(params: Params, x: jax.Array, config: ModelConfig) -> jax.Array:
    """Final norm and LM head on rows x [n, D] (last-layer activations): logits [n, V], f32."""
    h = norm(params["final_norm"], x, config)  # [n, D]
    if config.tie_embeddings:
        return jnp.einsum(
            "nD,VD->nV", h, params["embed"]["tokens"], preferred_element_type=jnp.float32
        )
    return jnp.einsum(
        "nD,DV->nV", h, params["lm_head"]["kernel"], preferred_element_type=jnp.float32
    )


def lm_head(params: Params, x: jax.Array, batch: RaggedBatch, config: ModelConfig) -> jax.Array:
    """Logits [R, V] (f32) of each request's last scheduled row of x [T, D]."""
    return logits_of(params, x[batch.logits_indices], config)


_LOGPROB_ROWS = 256  # rows of [rows, V] logits alive at once in `token_logprobs`


@functools.partial(jax.jit, static_argnames=("config", "num_top"))
def token_logprobs(
    params: Params,
    x: jax.Array,  # [T, D] last-layer activations of a step (`stage_step`'s hidden)
    targets: jax.Array,  # i32[T] token whose log-probability each row scores; < 0: none
    config: ModelConfig,
    num_top: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Log-probabilities at every packed row, not just each request's last: what scoring a
    prompt needs (vLLM's `prompt_logprobs`). Row t's distribution predicts token t + 1.

    Returns (logprob of targets[t] f32[T] (0 where no target), the num_top most likely ids
    i32[T, num_top], their logprobs f32[T, num_top], the target's rank i32[T] (1: the most
    likely)). Rows go through in chunks, so at most `_LOGPROB_ROWS` x V logits exist at once.
    """
    T = x.shape[0]
    C = min(T, _LOGPROB_ROWS)
    pad = -T % C  # rows up to a whole number of chunks (they score nothing)
    x = jnp.pad(x, ((0, pad), (0, 0)))
    targets = jnp.pad(targets, (0, pad), constant_values=-1)

    def chunk(args):
        x, t = args  # [C, D], [C]
        lp = jax.nn.log_softmax(logits_of(params, x, config), axis=-1)  # [C, V]
        target_lp = jnp.take_along_axis(lp, jnp.maximum(t, 0)[:, None], axis=-1)  # [C, 1]
        rank = 1 + jnp.sum(lp > target_lp, axis=-1, dtype=jnp.int32)
        top_lp, top_ids = jax.lax.top_k(lp, num_top)
        return jnp.where(t >= 0, target_lp[:, 0], 0.0), top_ids.astype(jnp.int32), top_lp, rank

    n = (T + pad) // C
    out = jax.lax.map(chunk, (x.reshape(n, C, -1), targets.reshape(n, C)))
    return jax.tree.map(lambda a: a.reshape(T + pad, *a.shape[2:])[:T], out)


def forward(
    params: Params,
    kv_cache: KVCache,
    batch: RaggedBatch,
    config: ModelConfig,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, KVCache]:
    """One iteration: write the batch's K/V into the pages, return next-token logits [R, V].

    `mesh`: when params and cache are split over its `model` axis (see `sharding/`), the
    attention runs per head shard; everything else is partitioned by XLA from the layouts.
    """
    x = embed(params, batch, config)  # [T, D]
    x, kv_cache = decoder_layers(params["layers"], kv_cache, x, batch, config, mesh)
    return lm_head(params, x, batch, config), kv_cache


@functools.partial(jax.jit, static_argnames=("config", "mesh"), donate_argnames=("kv_cache",))
def step(
    params: Params,
    kv_cache: KVCache,
    batch: RaggedBatch,
    config: ModelConfig,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, KVCache]:
    """Jitted `forward` with the cache donated, so the pages are updated in place."""
    return forward(params, kv_cache, batch, config, mesh)


@functools.partial(
    jax.jit, static_argnames=("config", "mesh", "first", "last"), donate_argnames=("kv_cache",)
)
def stage_step(
    params: Params,
    kv_cache: KVCache,
    x: jax.Array | None,  # [T, D] from the previous stage; None on the first
    batch: RaggedBatch,
    config: ModelConfig,
    mesh: Mesh | None = None,
    *,
    first: bool,
    last: bool,
) -> tuple[jax.Array, jax.Array | None, KVCache]:
    """One pipeline stage: its slice of the layers (and cache), plus the embedding on the
    first stage and the LM head on the last. `params` holds the stage's slice
    (sharding/pipeline).

    Returns (x [T, D]: the stage's output activations, logits [R, V] on the last stage or
    None, the stage's cache, updated in place). The last stage's x feeds `token_logprobs`.
    """
    if first:
        x = embed(params, batch, config)
    x, kv_cache = decoder_layers(params["layers"], kv_cache, x, batch, config, mesh)
    return x, (lm_head(params, x, batch, config) if last else None), kv_cache
