"""Sliding-window attention against transformers' `FlaxMistralForCausalLM`.

A random Flax Mistral is written as a Hugging Face checkpoint whose config.json has
`sliding_window = W`, loaded by our Hugging Face loader, and our logits (reference attention
and the Pallas kernel in interpret mode) are compared with the reference's for a prompt and
decode steps longer than the window. FlaxMistral's mask keeps W + 1 keys
(`triu(causal, k=-W)`), one more than torch's Mistral and vLLM, which keep the token and the
W - 1 before it; so the reference runs with W - 1 to mean what the checkpoint means.
"""

from __future__ import annotations

import numpy as np
import pytest
from hf_reference import (
    TINY_LLAMA,
    flax_to_torch_state_dict,
    our_logits,
    random_flax_model,
    reference_logits,
    rel_err,
    write_checkpoint,
)

transformers = pytest.importorskip("transformers")
from transformers import FlaxMistralForCausalLM  # noqa: E402

from models.loaders import load_safetensors  # noqa: E402

WINDOW = 5


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_sliding_window_matches_flax_mistral(impl, tmp_path):
    hf_config = transformers.MistralConfig(**TINY_LLAMA, sliding_window=WINDOW)
    model, flax_params = random_flax_model(FlaxMistralForCausalLM, hf_config, seed=2)
    cfg = write_checkpoint(tmp_path, hf_config, flax_to_torch_state_dict(flax_params))
    assert cfg.sliding_window == WINDOW
    params = load_safetensors(str(tmp_path), cfg)
    flax_config = transformers.MistralConfig(**TINY_LLAMA, sliding_window=WINDOW - 1)
    reference = FlaxMistralForCausalLM(flax_config, _do_init=False)
    rng = np.random.default_rng(0)
    prompt, decode = rng.integers(0, 256, 11).tolist(), rng.integers(0, 256, 6).tolist()
    ref = reference_logits(reference, flax_params, prompt, decode)
    page = 16 if impl == "pallas" else 4  # the kernel takes pages of 16 to 64
    ours = our_logits(params, cfg.replace(attention_impl=impl), prompt, decode, page_size=page)
    errors = [rel_err(o, r) for o, r in zip(ours, ref, strict=True)]
    assert max(errors) < 1e-4, errors
    # The window matters here: without it the logits are another model's.
    unwindowed = our_logits(params, cfg.replace(sliding_window=None), prompt, decode)
    assert max(rel_err(o, r) for o, r in zip(unwindowed, ref, strict=True)) > 1e-2


def test_engine_serves_a_mistral_directory(tmp_path):
    """`LLM(model=DIR)` of a Mistral checkpoint keeps its window: greedy tokens are the
    reference's argmax at every step (prompt and output longer than the window)."""
    from orca_jax import LLM, SamplingParams  # noqa: PLC0415

    hf_config = transformers.MistralConfig(**TINY_LLAMA, sliding_window=WINDOW)
    model, flax_params = random_flax_model(FlaxMistralForCausalLM, hf_config, seed=3)
    write_checkpoint(tmp_path, hf_config, flax_to_torch_state_dict(flax_params))
    llm = LLM(str(tmp_path), policy="paged", max_model_len=64)
    assert llm.engine.model_config.sliding_window == WINDOW
    prompt = np.random.default_rng(1).integers(0, 256, 9).tolist()
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    [out] = llm.generate([prompt], greedy, use_tqdm=False)
    tokens = list(out.outputs[0].token_ids)
    flax_config = transformers.MistralConfig(**TINY_LLAMA, sliding_window=WINDOW - 1)
    reference = FlaxMistralForCausalLM(flax_config, _do_init=False)
    ref = reference_logits(reference, flax_params, prompt, tokens)  # [1 + 8, V]
    assert tokens == ref[:-1].argmax(-1).tolist()
