"""Our GPT-2 path against transformers' `FlaxGPT2LMHeadModel` (an independent implementation).

A random Flax GPT-2 is written out as a Hugging Face torch-layout safetensors checkpoint (Conv1D
weights [in, out], q/k/v packed in `c_attn`), loaded with `load_safetensors`, and our logits for a
prefill and for decode steps over the paged cache are compared with the reference's logits at the
same positions (the reference runs the whole sequence at once, causally). Relative error is
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

from models import get_config, init_kv_cache, pack_batch, step  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.loaders import (  # noqa: E402
    config_from_hf_json,
    gpt2_params_from_state_dict,
    load_safetensors,
)

RTOL = 1e-4
PAGE_SIZE = 4

GPT2_CONFIGS = {
    "small": dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    # The `tiny-gpt` preset's shapes: config_from_hf_json must name it so.
    "tiny-gpt": dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    # An explicit n_inner (not 4 * n_embd), head dim 16, three layers.
    "n_inner": dict(vocab_size=300, n_embd=48, n_head=3, n_layer=3, n_inner=80, n_positions=64),
}


def flax_to_torch_state_dict(flax_params: dict) -> dict[str, np.ndarray]:
    """HF torch-layout state dict of Flax params (Flax GPT-2 keeps Conv1D kernels [out, in])."""
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


def _random_flax_gpt2(hf_config, seed: int = 0) -> tuple[object, dict]:
    """A Flax GPT-2 (no params) and random params for it, LayerNorm scales and biases too.

    transformers' own init runs op by op (seconds even for this size), so it is skipped.
    """
    model = transformers.FlaxGPT2LMHeadModel(hf_config, _do_init=False)
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


@pytest.mark.parametrize("name", sorted(GPT2_CONFIGS))
def test_gpt2_matches_flax_reference(name, tmp_path):
    hf_config = transformers.GPT2Config(**GPT2_CONFIGS[name])
    model, flax_params = _random_flax_gpt2(hf_config)
    sd = flax_to_torch_state_dict(flax_params)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (
        hf_config.n_embd,
        3 * hf_config.n_embd,
    )
    # The helper's layout is the one transformers itself maps from torch to Flax.
    like = SimpleNamespace(params=flax_params, base_model_prefix=model.base_model_prefix)
    back = convert_pytorch_state_dict_to_flax(dict(sd), like)  # reads only these two
    jax.tree.map(np.testing.assert_array_equal, back, flax_params)

    cfg = _write_checkpoint(tmp_path, hf_config, sd)
    if name == "tiny-gpt":
        assert cfg == get_config("tiny-gpt")
    assert cfg.d_ff == (hf_config.n_inner or 4 * hf_config.n_embd)
    params = load_safetensors(str(tmp_path))  # config from the directory's config.json

    rng = np.random.default_rng(1)
    prompt = rng.integers(0, hf_config.vocab_size, 7).tolist()
    decode = rng.integers(0, hf_config.vocab_size, 5).tolist()
    ref = _reference_logits(model, flax_params, prompt, decode)
    ours = _our_logits(params, cfg, prompt, decode)
    assert ours.shape == ref.shape == (6, hf_config.vocab_size)
    assert _rel_err(ours[0], ref[0]) < RTOL, "prefill"
    for i in range(1, len(ours)):
        assert _rel_err(ours[i], ref[i]) < RTOL, f"decode step {i}"


def test_key_variants_and_shards_load_the_same(tmp_path):
    """Unprefixed `h.0...` names, causal-mask buffers and sharded files give the same params."""
    hf_config = transformers.GPT2Config(**GPT2_CONFIGS["small"])
    sd = flax_to_torch_state_dict(_random_flax_gpt2(hf_config)[1])
    cfg = _write_checkpoint(tmp_path, hf_config, sd)
    want = gpt2_params_from_state_dict(sd, cfg)

    bare = {k.removeprefix("transformer."): v for k, v in sd.items()}
    bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.float32))  # old checkpoints
    jax.tree.map(np.testing.assert_array_equal, gpt2_params_from_state_dict(bare, cfg), want)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[::2]}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[1::2]}, str(sharded / "model-00002-of-00002.safetensors"))
    jax.tree.map(np.testing.assert_array_equal, load_safetensors(str(sharded), cfg), want)

    # A shorter context than the checkpoint's keeps the first positions.
    short = gpt2_params_from_state_dict(sd, cfg.replace(max_seq_len=32))
    np.testing.assert_array_equal(short["embed"]["positions"], want["embed"]["positions"][:32])
    with pytest.raises(ValueError, match="positions"):
        gpt2_params_from_state_dict(sd, cfg.replace(max_seq_len=256))


def test_unsupported_gpt2_configs_are_rejected(tmp_path):
    for bad in (dict(activation_function="relu"), dict(scale_attn_by_inverse_layer_idx=True)):
        hf_config = transformers.GPT2Config(**GPT2_CONFIGS["small"], **bad)
        (tmp_path / "config.json").write_text(hf_config.to_json_string())
        with pytest.raises(ValueError):
            config_from_hf_json(str(tmp_path / "config.json"))
