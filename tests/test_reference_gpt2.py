"""Our GPT-2 path against transformers' `FlaxGPT2LMHeadModel` (an independent implementation).

A random Flax GPT-2 is written out as a Hugging Face torch-layout safetensors checkpoint (Conv1D
weights [in, out], q/k/v packed in `c_attn`), loaded with `load_safetensors`, and our logits for a
prefill and for decode steps over the paged cache are compared with the reference's logits at the
same positions (the reference runs the whole sequence at once, causally). Relative error is
max|ours - ref| / max|ref|.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hf_reference import (
    check_layout_is_transformers_own,
    check_logits_match,
    flax_to_torch_state_dict,
    random_flax_model,
    write_checkpoint,
)
from safetensors.numpy import save_file

transformers = pytest.importorskip("transformers")
from transformers import FlaxGPT2LMHeadModel  # noqa: E402

from models import get_config  # noqa: E402
from models.loaders import (  # noqa: E402
    config_from_hf_json,
    gpt2_params_from_state_dict,
    load_safetensors,
)

RTOL = 1e-4

GPT2_CONFIGS = {
    "small": dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    # The `tiny-gpt` preset's shapes: config_from_hf_json must name it so.
    "tiny-gpt": dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    # An explicit n_inner (not 4 * n_embd), head dim 16, three layers.
    "n_inner": dict(vocab_size=300, n_embd=48, n_head=3, n_layer=3, n_inner=80, n_positions=64),
}


@pytest.mark.parametrize("name", sorted(GPT2_CONFIGS))
def test_gpt2_matches_flax_reference(name, tmp_path):
    hf_config = transformers.GPT2Config(**GPT2_CONFIGS[name])
    model, flax_params = random_flax_model(FlaxGPT2LMHeadModel, hf_config)
    sd = flax_to_torch_state_dict(flax_params)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (
        hf_config.n_embd,
        3 * hf_config.n_embd,
    )
    check_layout_is_transformers_own(model, flax_params, sd)

    cfg = write_checkpoint(tmp_path, hf_config, sd)
    if name == "tiny-gpt":
        assert cfg == get_config("tiny-gpt")
    assert cfg.d_ff == (hf_config.n_inner or 4 * hf_config.n_embd)
    params = load_safetensors(str(tmp_path))  # config from the directory's config.json

    check_logits_match(model, flax_params, params, cfg, RTOL)


@pytest.mark.parametrize("unroll,fused_linear", [(2, False), (3, False), (None, True), (3, True)])
def test_unrolled_layers_match_flax_reference(unroll, fused_linear, tmp_path):
    """`layer_unroll` (2 of 3 layers: a loop with a remainder; 3: no loop, every layer's
    weights sliced statically) computes the same logits as the reference; so does every
    linear layer as the Pallas kernel with its bias, GELU, the LayerNorm before it and the
    residual add after it fused (`fused_linear`), layers scanned or unrolled."""
    hf_config = transformers.GPT2Config(**GPT2_CONFIGS["n_inner"])
    model, flax_params = random_flax_model(FlaxGPT2LMHeadModel, hf_config)
    cfg = write_checkpoint(tmp_path, hf_config, flax_to_torch_state_dict(flax_params))
    params = load_safetensors(str(tmp_path))
    cfg = cfg.replace(layer_unroll=unroll, fused_linear=fused_linear)
    check_logits_match(model, flax_params, params, cfg, RTOL)


def test_key_variants_and_shards_load_the_same(tmp_path):
    """Unprefixed `h.0...` names, causal-mask buffers and sharded files give the same params."""
    hf_config = transformers.GPT2Config(**GPT2_CONFIGS["small"])
    sd = flax_to_torch_state_dict(random_flax_model(FlaxGPT2LMHeadModel, hf_config)[1])
    cfg = write_checkpoint(tmp_path, hf_config, sd)
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


def test_speculative_greedy_follows_the_reference_at_every_token(tmp_path):
    """The engine with n-gram drafts, greedy: each output token is the reference's argmax
    given the prompt and the tokens before it (one causal pass over the whole sequence)."""
    from orca_jax import Engine, EngineConfig, SamplingParams  # noqa: PLC0415
    from orca_jax.engine.speculative import SpeculativeConfig  # noqa: PLC0415

    hf_config = transformers.GPT2Config(**GPT2_CONFIGS["small"])
    model, flax_params = random_flax_model(FlaxGPT2LMHeadModel, hf_config, seed=2)
    cfg = write_checkpoint(tmp_path, hf_config, flax_to_torch_state_dict(flax_params))
    config = EngineConfig(
        max_batch_size=4,
        block_size=4,
        max_model_len=96,
        max_num_batched_tokens=64,
        num_kv_blocks=100,
        speculative=SpeculativeConfig(num_speculative_tokens=4),
        warmup=False,
    )
    engine = Engine(cfg, load_safetensors(str(tmp_path)), None, config)
    rng = np.random.default_rng(0)
    prompts = [(rng.integers(0, 256, 3).tolist() * 6)[: 8 + i] for i in range(6)]
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, SamplingParams(max_tokens=40), request_id=str(i))
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert engine.num_accepted_tokens > 0
    forward = jax.jit(lambda params, ids: model(ids, params=params).logits[0])
    for i, prompt in enumerate(prompts):
        ids = prompt + outputs[str(i)]
        logits = np.asarray(forward(flax_params, np.asarray([ids], np.int32)))
        assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == outputs[str(i)], i
