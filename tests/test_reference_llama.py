"""Our Llama path against transformers' `FlaxLlamaForCausalLM` (an independent implementation).

A random Flax Llama is written out as a Hugging Face torch-layout safetensors checkpoint, loaded
with `load_safetensors` / `llama_params_from_state_dict`, and our logits for a prefill and for
decode steps over the paged cache are compared with the reference's logits at the same positions
(the reference runs the whole sequence at once, causally). Relative error is
max|ours - ref| / max|ref|.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import (
    TINY_LLAMA,
    check_layout_is_transformers_own,
    check_logits_match,
    flax_to_torch_state_dict,
    our_logits,
    patch_flax_llama_rope_theta,
    random_flax_model,
    reference_logits,
    rel_err,
    sincos,
    write_checkpoint,
)

transformers = pytest.importorskip("transformers")
from transformers import FlaxLlamaForCausalLM  # noqa: E402
from transformers.models.llama import modeling_flax_llama  # noqa: E402

from models.loaders import (  # noqa: E402
    llama_params_from_state_dict,
    load_safetensors,
)

RTOL = 1e-4


@pytest.fixture
def flax_llama_with_rope_theta(monkeypatch):
    patch_flax_llama_rope_theta(monkeypatch)


def test_sincos_patch_is_the_original_at_base_10000():
    np.testing.assert_array_equal(
        sincos(64, 16, 10000.0), modeling_flax_llama.create_sinusoidal_positions(64, 16)
    )


LLAMA_CONFIGS = {
    # GQA (4 query heads on 2 KV heads), RoPE base != 10000, untied head.
    "gqa": TINY_LLAMA | dict(rope_theta=50000.0),
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
    model, flax_params = random_flax_model(FlaxLlamaForCausalLM, hf_config)
    sd = flax_to_torch_state_dict(flax_params)
    assert "model.layers.0.self_attn.q_proj.weight" in sd and "lm_head.weight" in sd
    check_layout_is_transformers_own(model, flax_params, sd)

    cfg = write_checkpoint(tmp_path, hf_config, sd)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta) == (
        hf_config.num_attention_heads,
        hf_config.num_key_value_heads,
        hf_config.rope_theta,
    )
    assert not cfg.tie_embeddings and cfg.norm == "rmsnorm" and cfg.position == "rope"
    params = load_safetensors(str(tmp_path), cfg)

    check_logits_match(model, flax_params, params, cfg, RTOL)
    # every linear layer as the Pallas kernel (SwiGLU's gate and up without epilogue)
    check_logits_match(model, flax_params, params, cfg.replace(fused_linear=True), RTOL)


@pytest.mark.usefixtures("flax_llama_with_rope_theta")
@pytest.mark.parametrize("kv_cache_dtype,rtol", [("fp8", 0.1), ("fp8_e5m2", 0.2)])
def test_fp8_kv_cache_stays_near_the_reference(kv_cache_dtype, rtol, tmp_path):
    """K/V stored in 8 bits (e4m3: 3 mantissa bits, about 3% per value; e5m2: 2 bits) move
    the logits off the float32 reference by a few percent of their range, not more (seed 0
    measured 0.059 for e4m3 and 0.11 for e5m2, 5e-7 with a float32 cache)."""
    hf_config = transformers.LlamaConfig(**LLAMA_CONFIGS["gqa"], tie_word_embeddings=False)
    model, flax_params = random_flax_model(FlaxLlamaForCausalLM, hf_config)
    cfg = write_checkpoint(tmp_path, hf_config, flax_to_torch_state_dict(flax_params))
    params = load_safetensors(str(tmp_path), cfg)
    prompt, decode = [3, 14, 15, 92, 65, 35, 8, 9, 200, 17, 4], [89, 79, 32, 38, 5, 6]
    ref = reference_logits(model, flax_params, prompt, decode)
    ours = our_logits(params, cfg.replace(kv_cache_dtype=kv_cache_dtype), prompt, decode)
    errors = [rel_err(o, r) for o, r in zip(ours, ref, strict=True)]
    assert 1e-3 < max(errors) < rtol, errors  # fp8 really in use, and close


@pytest.mark.usefixtures("flax_llama_with_rope_theta")
def test_llama_tied_embeddings(tmp_path):
    """FlaxLlama has no tied head, so tie it by hand: lm_head = embed^T, absent from the dict."""
    hf_config = transformers.LlamaConfig(**LLAMA_CONFIGS["gqa"], tie_word_embeddings=True)
    model, flax_params = random_flax_model(FlaxLlamaForCausalLM, hf_config, seed=3)
    embed = flax_params["model"]["embed_tokens"]["embedding"]  # [V, D]
    flax_params["lm_head"]["kernel"] = embed.T
    sd = flax_to_torch_state_dict(flax_params)
    del sd["lm_head.weight"]
    cfg = write_checkpoint(tmp_path, hf_config, sd)
    assert cfg.tie_embeddings
    params = load_safetensors(str(tmp_path))  # config from the directory's config.json
    assert "lm_head" not in params

    prompt, decode = [3, 14, 15, 92, 65, 35], [89, 79, 32, 38]
    ref = reference_logits(model, flax_params, prompt, decode)
    ours = our_logits(params, cfg, prompt, decode)
    for i in range(len(ours)):
        assert rel_err(ours[i], ref[i]) < RTOL, f"step {i}"


def test_missing_and_unexpected_tensors_are_errors(tmp_path):
    hf_config = transformers.LlamaConfig(**LLAMA_CONFIGS["gqa"], tie_word_embeddings=False)
    sd = flax_to_torch_state_dict(random_flax_model(FlaxLlamaForCausalLM, hf_config)[1])
    cfg = write_checkpoint(tmp_path, hf_config, sd)
    with pytest.raises(KeyError, match="lm_head.weight"):
        llama_params_from_state_dict({k: v for k, v in sd.items() if k != "lm_head.weight"}, cfg)
    with pytest.raises(ValueError, match="unexpected"):
        llama_params_from_state_dict({**sd, "model.extra.weight": np.zeros(3)}, cfg)
    with pytest.raises(ValueError, match="shape"):
        llama_params_from_state_dict(sd, cfg.replace(d_ff=cfg.d_ff * 2))


def test_bf16_load(tmp_path):
    hf_config = transformers.LlamaConfig(**LLAMA_CONFIGS["gqa"], tie_word_embeddings=False)
    sd = flax_to_torch_state_dict(random_flax_model(FlaxLlamaForCausalLM, hf_config)[1])
    cfg = write_checkpoint(tmp_path, hf_config, sd).replace(dtype="bfloat16")
    params = load_safetensors(str(tmp_path / "model.safetensors"), cfg)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
