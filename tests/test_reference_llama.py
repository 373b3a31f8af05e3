"""Our Llama path against transformers' `FlaxLlamaForCausalLM` (an independent implementation).

A random Flax Llama is written out as a Hugging Face torch-layout safetensors checkpoint, loaded
with `load_safetensors` / `llama_params_from_state_dict`, and our logits for a prefill and for
decode steps over the paged cache are compared with the reference's logits at the same positions
(the reference runs the whole sequence at once, causally). Relative error is
max|ours - ref| / max|ref|.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

transformers = pytest.importorskip("transformers")
from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax  # noqa: E402
from transformers.models.llama import modeling_flax_llama  # noqa: E402

from models import init_kv_cache, pack_batch, step  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.loaders import (  # noqa: E402
    config_from_hf_json,
    llama_params_from_state_dict,
    load_safetensors,
)

RTOL = 1e-4
PAGE_SIZE = 4


def _sincos(num_pos: int, dim: int, theta: float) -> jax.Array:
    """FlaxLlama's `create_sinusoidal_positions` with the base `theta` instead of 10000."""
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2) / dim))
    freqs = np.einsum("i , j -> i j", np.arange(num_pos), inv_freq).astype("float32")
    emb = np.concatenate((freqs, freqs), axis=-1)
    out = np.concatenate((np.sin(emb)[:, None, :], np.cos(emb)[:, None, :]), axis=-1)
    return jnp.array(out[:, :, :num_pos])


def _rotary_setup_with_theta(self) -> None:
    head_dim = self.config.hidden_size // self.config.num_attention_heads
    self.sincos = _sincos(self.config.max_position_embeddings, head_dim, self.config.rope_theta)


@pytest.fixture
def flax_llama_with_rope_theta(monkeypatch):
    """FlaxLlama hard-codes RoPE base 10000 (it ignores `config.rope_theta`); patch only that."""
    monkeypatch.setattr(
        modeling_flax_llama.FlaxLlamaRotaryEmbedding, "setup", _rotary_setup_with_theta
    )


def test_sincos_patch_is_the_original_at_base_10000():
    np.testing.assert_array_equal(
        _sincos(64, 16, 10000.0), modeling_flax_llama.create_sinusoidal_positions(64, 16)
    )


def flax_to_torch_state_dict(flax_params: dict) -> dict[str, np.ndarray]:
    """HF torch-layout state dict of Flax params (Linear kernels [in, out] -> weights [out, in])."""
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


def _random_flax_llama(hf_config, seed: int = 0) -> tuple[object, dict]:
    """A Flax Llama (no params) and random params for it, RMSNorm scales too.

    transformers' own init runs op by op (seconds even for this size), so it is skipped.
    """
    model = modeling_flax_llama.FlaxLlamaForCausalLM(hf_config, _do_init=False)
    rng = np.random.default_rng(seed)

    def init(path, sds) -> np.ndarray:
        gain = 1.0 if path[-1].key in ("scale", "weight") else 0.0  # norm gains around 1
        return (gain + 0.1 * rng.standard_normal(sds.shape)).astype(np.float32)

    return model, jax.tree_util.tree_map_with_path(init, model.params_shape_tree)


def _write_checkpoint(directory, hf_config, sd: dict[str, np.ndarray]) -> ModelConfig:
    """Write `model.safetensors` and `config.json`; return our config read from the latter."""
    save_file(sd, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(hf_config.to_json_string())
    return config_from_hf_json(str(directory))


def _our_logits(params, cfg: ModelConfig, prompt: list[int], decode: list[int]) -> np.ndarray:
    """Logits [1 + len(decode), V]: the prefill's last token, then one per decode step."""
    total = len(prompt) + len(decode)
    blocks = [5, 2, 7, 1, 3, 6][: -(-total // PAGE_SIZE)]  # scattered pages, page 0 unused
    pack = dict(page_size=PAGE_SIZE, num_tokens=16, num_reqs=2, max_blocks=len(blocks))
    cache = init_kv_cache(cfg, num_pages=8, page_size=PAGE_SIZE)
    logits, cache = step(params, cache, pack_batch([(prompt, 0, blocks)], **pack), cfg)
    out = [logits[0]]
    for i, tok in enumerate(decode):
        batch = pack_batch([([tok], len(prompt) + i, blocks)], **pack)
        logits, cache = step(params, cache, batch, cfg)
        out.append(logits[0])
    return np.asarray(jnp.stack(out))


def _reference_logits(model, params, prompt: list[int], decode: list[int]) -> np.ndarray:
    """The reference's logits at the positions ours predict from (one causal pass)."""
    ids = jnp.asarray([prompt + decode], jnp.int32)
    forward = jax.jit(lambda params, ids: model(ids, params=params).logits[0])  # eager is slower
    logits = np.asarray(forward(params, ids), np.float32)  # [T, V]
    return logits[len(prompt) - 1 :]


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


LLAMA_CONFIGS = {
    # GQA (4 query heads on 2 KV heads), RoPE base != 10000, untied head.
    "gqa": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
    ),
    # Multi-query, three layers, head dim 32.
    "mqa": dict(
        vocab_size=300,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=1,
        rope_theta=100000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
    ),
}


@pytest.mark.usefixtures("flax_llama_with_rope_theta")
@pytest.mark.parametrize("name", sorted(LLAMA_CONFIGS))
def test_llama_matches_flax_reference(name, tmp_path):
    hf_config = transformers.LlamaConfig(**LLAMA_CONFIGS[name], tie_word_embeddings=False)
    model, flax_params = _random_flax_llama(hf_config)
    sd = flax_to_torch_state_dict(flax_params)
    assert "model.layers.0.self_attn.q_proj.weight" in sd and "lm_head.weight" in sd
    # The helper's layout is the one transformers itself maps from torch to Flax.
    like = SimpleNamespace(params=flax_params, base_model_prefix=model.base_model_prefix)
    back = convert_pytorch_state_dict_to_flax(dict(sd), like)  # reads only these two
    jax.tree.map(np.testing.assert_array_equal, back, flax_params)

    cfg = _write_checkpoint(tmp_path, hf_config, sd)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta) == (
        hf_config.num_attention_heads,
        hf_config.num_key_value_heads,
        hf_config.rope_theta,
    )
    assert not cfg.tie_embeddings and cfg.norm == "rmsnorm" and cfg.position == "rope"
    params = load_safetensors(str(tmp_path), cfg)

    rng = np.random.default_rng(1)
    prompt = rng.integers(0, hf_config.vocab_size, 7).tolist()
    decode = rng.integers(0, hf_config.vocab_size, 5).tolist()
    ref = _reference_logits(model, flax_params, prompt, decode)
    ours = _our_logits(params, cfg, prompt, decode)
    assert ours.shape == ref.shape == (6, hf_config.vocab_size)
    assert _rel_err(ours[0], ref[0]) < RTOL, "prefill"
    for i in range(1, len(ours)):
        assert _rel_err(ours[i], ref[i]) < RTOL, f"decode step {i}"


@pytest.mark.usefixtures("flax_llama_with_rope_theta")
def test_llama_tied_embeddings(tmp_path):
    """FlaxLlama has no tied head, so tie it by hand: lm_head = embed^T, absent from the dict."""
    hf_config = transformers.LlamaConfig(**LLAMA_CONFIGS["gqa"], tie_word_embeddings=True)
    model, flax_params = _random_flax_llama(hf_config, seed=3)
    embed = flax_params["model"]["embed_tokens"]["embedding"]  # [V, D]
    flax_params["lm_head"]["kernel"] = embed.T
    sd = flax_to_torch_state_dict(flax_params)
    del sd["lm_head.weight"]
    cfg = _write_checkpoint(tmp_path, hf_config, sd)
    assert cfg.tie_embeddings
    params = load_safetensors(str(tmp_path))  # config from the directory's config.json
    assert "lm_head" not in params

    prompt, decode = [3, 14, 15, 92, 65, 35], [89, 79, 32, 38]
    ref = _reference_logits(model, flax_params, prompt, decode)
    ours = _our_logits(params, cfg, prompt, decode)
    for i in range(len(ours)):
        assert _rel_err(ours[i], ref[i]) < RTOL, f"step {i}"


def test_missing_and_unexpected_tensors_are_errors(tmp_path):
    hf_config = transformers.LlamaConfig(**LLAMA_CONFIGS["gqa"], tie_word_embeddings=False)
    sd = flax_to_torch_state_dict(_random_flax_llama(hf_config)[1])
    cfg = _write_checkpoint(tmp_path, hf_config, sd)
    with pytest.raises(KeyError, match="lm_head.weight"):
        llama_params_from_state_dict({k: v for k, v in sd.items() if k != "lm_head.weight"}, cfg)
    with pytest.raises(ValueError, match="unexpected"):
        llama_params_from_state_dict({**sd, "model.extra.weight": np.zeros(3)}, cfg)
    with pytest.raises(ValueError, match="shape"):
        llama_params_from_state_dict(sd, cfg.replace(d_ff=cfg.d_ff * 2))


def test_bf16_load(tmp_path):
    hf_config = transformers.LlamaConfig(**LLAMA_CONFIGS["gqa"], tie_word_embeddings=False)
    sd = flax_to_torch_state_dict(_random_flax_llama(hf_config)[1])
    cfg = _write_checkpoint(tmp_path, hf_config, sd).replace(dtype="bfloat16")
    params = load_safetensors(str(tmp_path / "model.safetensors"), cfg)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
