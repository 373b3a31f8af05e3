"""Models given by path, as vLLM takes them: a Hugging Face directory or a .gguf file."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from hf_reference import flax_to_torch_state_dict, random_flax_model, write_checkpoint

transformers = pytest.importorskip("transformers")
from transformers import FlaxGPT2LMHeadModel  # noqa: E402

from models import get_config  # noqa: E402
from orca_jax import LLM, SamplingParams  # noqa: E402
from orca_jax.model_loader import load_model, model_config  # noqa: E402

HF = dict(vocab_size=300, n_embd=48, n_head=3, n_layer=3, n_inner=80, n_positions=64)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random GPT-2 written as a Hugging Face directory; (path, reference model, params)."""
    hf_config = transformers.GPT2Config(**HF)
    model, flax_params = random_flax_model(FlaxGPT2LMHeadModel, hf_config, seed=9)
    path = tmp_path_factory.mktemp("hf-gpt2")
    write_checkpoint(path, hf_config, flax_to_torch_state_dict(flax_params))
    return str(path), model, flax_params


def _reference_greedy(model, params, prompt: list[int], n: int) -> list[int]:
    forward = jax.jit(lambda p, ids: model(ids, params=p).logits[0, -1])
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(forward(params, np.asarray([ids], np.int32)))))
    return ids[len(prompt) :]


def test_llm_serves_a_hugging_face_directory(hf_dir):
    """LLM(model=DIR) reads config, weights (and no tokenizer: there is none) from the
    directory; its greedy tokens are transformers' Flax GPT-2's."""
    path, model, params = hf_dir
    cfg = model_config(path)
    assert (cfg.vocab_size, cfg.n_layers, cfg.d_ff, cfg.max_seq_len) == (300, 3, 80, 64)
    llm = LLM(model=path, warmup=False, max_logprobs=0)
    assert llm.get_tokenizer() is None and llm.engine.model_config == cfg
    prompt = [5, 17, 230, 4, 99]
    [out] = llm.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert out.token_ids == _reference_greedy(model, params, prompt, 6)
    with pytest.raises(ValueError, match="brings its own weights"):
        load_model(path, weights=os.path.join(path, "model.safetensors"))
    assert load_model(path, weights="random").params is not None  # its shapes, random values


def test_a_gguf_path_is_the_smollm2_preset():
    from models.loaders.gguf_llama import default_model_path  # noqa: PLC0415

    path = default_model_path()
    cfg = model_config(path, dtype="bfloat16")
    preset = get_config("smollm2-135m")
    fields = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "rope_theta")
    assert [getattr(cfg, f) for f in fields] == [getattr(preset, f) for f in fields]
    assert cfg.dtype == "bfloat16"
    loaded = load_model(path)
    assert loaded.tokenizer is not None and loaded.tokenizer.chat_template


def test_unknown_models_say_what_is_accepted(tmp_path):
    with pytest.raises(ValueError, match="neither a preset .* nor a Hugging Face directory"):
        model_config("no-such-model")
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        model_config(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError):  # a directory without config.json
        model_config(str(tmp_path))
