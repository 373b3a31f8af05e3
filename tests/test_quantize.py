"""Weight-only int8 (`quantization="int8"`): the kernels round-trip within half a step,
the model stays close to transformers' float GPT-2, spreads over devices like the float one,
and SmolLM2's real weights still answer; the layer weights take half of bf16's bytes."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hf_reference import (
    flax_to_torch_state_dict,
    our_logits,
    random_flax_model,
    reference_logits,
    rel_err,
    write_checkpoint,
)
from parallel_utils import engine_matches_one_device

transformers = pytest.importorskip("transformers")
from transformers import FlaxGPT2LMHeadModel  # noqa: E402

from models import get_config, param_shapes  # noqa: E402
from models.loaders import load_safetensors  # noqa: E402
from models.quantize import quantize_kernel, quantize_params  # noqa: E402


@pytest.mark.parametrize("shape,contracted", [((3, 8, 4, 5), (1,)), ((2, 4, 5, 8), (1, 2))])
def test_kernels_round_trip_within_half_a_step(shape, contracted):
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    w[0, ..., 0] = 0.0  # an all-zero channel keeps a usable scale
    q, scale = (np.asarray(a) for a in quantize_kernel(w, contracted))
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127
    want = np.abs(w).max(axis=contracted) / 127  # numpy's own per-channel scale
    np.testing.assert_allclose(scale, np.where(want > 0, want, 1.0), rtol=1e-6)
    back = q * np.expand_dims(scale, contracted)
    assert (np.abs(back - w) <= np.expand_dims(scale, contracted) / 2 + 1e-6).all()


def test_close_to_transformers_float_gpt2(tmp_path):
    """Quantized ours against the float reference: close logits, mostly the same top token
    (a float run of ours agrees to 1e-4, `test_reference_gpt2.py`)."""
    hf_config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4)
    model, flax_params = random_flax_model(FlaxGPT2LMHeadModel, hf_config, seed=3)
    cfg = write_checkpoint(tmp_path, hf_config, flax_to_torch_state_dict(flax_params))
    cfg = cfg.replace(quantization="int8")
    params = quantize_params(load_safetensors(str(tmp_path)), cfg)
    assert params["layers"]["q"]["kernel"].dtype == np.int8
    rng = np.random.default_rng(1)
    prompt, decode = rng.integers(0, 256, 9).tolist(), rng.integers(0, 256, 6).tolist()
    ours = our_logits(params, cfg, prompt, decode)
    ref = reference_logits(model, flax_params, prompt, decode)
    assert 1e-4 < rel_err(ours, ref) < 0.03  # quantized (not float), yet close
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 5 / 7


def test_layer_weights_take_half_of_bf16():
    def nbytes(cfg):
        leaves = jax.tree.leaves(param_shapes(cfg)["layers"])
        return sum(x.size * x.dtype.itemsize for x in leaves)

    bf16 = get_config("gpt2", dtype="bfloat16")
    ratio = nbytes(bf16.replace(quantization="int8")) / nbytes(bf16)
    assert 0.5 < ratio < 0.51  # int8 kernels, plus one f32 scale per output channel


@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)])
def test_spread_over_devices_gives_one_devices_tokens(parallel):
    cfg = get_config("tiny-llama", quantization="int8")
    engine_matches_one_device(cfg, seed=4, parallel_kw=parallel)


def test_smollm2_int8_still_answers():
    from orca_jax import LLM, SamplingParams  # noqa: PLC0415

    llm = LLM("smollm2-135m", quantization="int8", warmup=False, max_model_len=128)
    assert llm.engine.model_config.quantization == "int8"
    question = [{"role": "user", "content": "What is the capital of France?"}]
    [out] = llm.chat(question, SamplingParams(max_tokens=16), use_tqdm=False)
    assert "Paris" in out.outputs[0].text, out.outputs[0].text
