"""Helpers for checking our models against transformers' Flax implementations.

A random Flax model is written out as a Hugging Face torch-layout safetensors checkpoint, then
our logits for a prefill and for decode steps over the paged cache are compared with the
reference's logits at the same positions (the reference runs the whole sequence at once,
causally). Relative error is max|ours - ref| / max|ref|.

transformers is imported only inside the helpers that need it (the layout check, the RoPE
patch), so importing this module never needs it.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

from models import init_kv_cache, pack_batch, step
from models.config import ModelConfig
from models.loaders import config_from_hf_json

PAGE_SIZE = 4
# A tiny Llama (transformers' LlamaConfig fields): GQA, 4 query heads over 2 KV heads.
TINY_LLAMA = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
)


def flax_to_torch_state_dict(flax_params: dict) -> dict[str, np.ndarray]:
    """HF torch-layout state dict of Flax params: every kernel is transposed.

    Flax Llama's Dense kernels [in, out] become torch Linear weights [out, in]; Flax GPT-2
    keeps its Conv1D kernels [out, in], so they become torch Conv1D weights [in, out].
    """
    sd = {}
    for path, value in flatten_dict(flax_params).items():
        *prefix, leaf = path
        value = np.asarray(value, np.float32)
        if leaf == "kernel":
            value = value.T
        if leaf in ("kernel", "embedding", "scale"):
            leaf = "weight"
        sd[".".join([*prefix, leaf])] = np.ascontiguousarray(value)
    return sd


def random_flax_model(model_cls, hf_config, seed: int = 0) -> tuple[object, dict]:
    """A `model_cls` Flax model (no params) and random params for it, norm scales and biases too.

    transformers' own init runs op by op (seconds even for these sizes), so it is skipped.
    """
    model = model_cls(hf_config, _do_init=False)
    rng = np.random.default_rng(seed)

    def init(path, sds) -> np.ndarray:
        gain = 1.0 if path[-1].key in ("scale", "weight") else 0.0  # norm gains around 1
        return (gain + 0.1 * rng.standard_normal(sds.shape)).astype(np.float32)

    return model, jax.tree_util.tree_map_with_path(init, model.params_shape_tree)


def write_checkpoint(directory, hf_config, sd: dict[str, np.ndarray]) -> ModelConfig:
    """Write `model.safetensors` and `config.json`; return our config read from the latter."""
    save_file(sd, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(hf_config.to_json_string())
    return config_from_hf_json(str(directory))


def our_logits(
    params,
    cfg: ModelConfig,
    prompt: list[int],
    decode: list[int],
    *,
    page_size: int = PAGE_SIZE,
    blocks: list[int] | None = None,
    num_pages: int = 8,
    num_reqs: int = 2,
) -> np.ndarray:
    """Logits [1 + len(decode), V]: the prefill's last token, then one per decode step.

    `blocks` is the request's block table; by default scattered pages, page 0 unused.
    """
    if blocks is None:
        total = len(prompt) + len(decode)
        blocks = [5, 2, 7, 1, 3, 6][: -(-total // page_size)]
    pack = dict(page_size=page_size, num_tokens=16, num_reqs=num_reqs, max_blocks=len(blocks))
    cache = init_kv_cache(cfg, num_pages=num_pages, page_size=page_size)
    logits, cache = step(params, cache, pack_batch([(prompt, 0, blocks)], **pack), cfg)
    out = [logits[0]]
    for i, tok in enumerate(decode):
        batch = pack_batch([([tok], len(prompt) + i, blocks)], **pack)
        logits, cache = step(params, cache, batch, cfg)
        out.append(logits[0])
    return np.asarray(jnp.stack(out))


def reference_logits(model, params, prompt: list[int], decode: list[int]) -> np.ndarray:
    """The reference's logits at the positions ours predict from (one causal pass)."""
    ids = jnp.asarray([prompt + decode], jnp.int32)
    forward = jax.jit(lambda params, ids: model(ids, params=params).logits[0])  # eager is slower
    logits = np.asarray(forward(params, ids), np.float32)  # [T, V]
    return logits[len(prompt) - 1 :]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def check_layout_is_transformers_own(model, flax_params: dict, sd: dict[str, np.ndarray]) -> None:
    """The layout of `flax_to_torch_state_dict` is the one transformers maps from torch to Flax."""
    from transformers.modeling_flax_pytorch_utils import (  # noqa: PLC0415
        convert_pytorch_state_dict_to_flax,
    )

    like = SimpleNamespace(params=flax_params, base_model_prefix=model.base_model_prefix)
    back = convert_pytorch_state_dict_to_flax(dict(sd), like)  # reads only these two
    jax.tree.map(np.testing.assert_array_equal, back, flax_params)


def check_logits_match(model, flax_params: dict, params, cfg: ModelConfig, rtol: float) -> None:
    """Ours and the reference's logits within `rtol` for a random 7-token prompt, 5 decode steps."""
    vocab_size = model.config.vocab_size
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, vocab_size, 7).tolist()
    decode = rng.integers(0, vocab_size, 5).tolist()
    ref = reference_logits(model, flax_params, prompt, decode)
    ours = our_logits(params, cfg, prompt, decode)
    assert ours.shape == ref.shape == (6, vocab_size)
    assert rel_err(ours[0], ref[0]) < rtol, "prefill"
    for i in range(1, len(ours)):
        assert rel_err(ours[i], ref[i]) < rtol, f"decode step {i}"


def sincos(num_pos: int, dim: int, theta: float) -> jax.Array:
    """FlaxLlama's `create_sinusoidal_positions` with the base `theta` instead of 10000."""
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2) / dim))
    freqs = np.einsum("i , j -> i j", np.arange(num_pos), inv_freq).astype("float32")
    emb = np.concatenate((freqs, freqs), axis=-1)
    out = np.concatenate((np.sin(emb)[:, None, :], np.cos(emb)[:, None, :]), axis=-1)
    return jnp.array(out[:, :, :num_pos])


def _rotary_setup_with_theta(self) -> None:
    head_dim = self.config.hidden_size // self.config.num_attention_heads
    self.sincos = sincos(self.config.max_position_embeddings, head_dim, self.config.rope_theta)


def patch_flax_llama_rope_theta(monkeypatch) -> None:
    """FlaxLlama hard-codes RoPE base 10000 (it ignores `config.rope_theta`); patch only that."""
    from transformers.models.llama import modeling_flax_llama  # noqa: PLC0415

    monkeypatch.setattr(
        modeling_flax_llama.FlaxLlamaRotaryEmbedding, "setup", _rotary_setup_with_theta
    )
