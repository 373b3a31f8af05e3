"""PEFT LoRA adapters into our layout (`models/loaders/peft_lora.py`).

The layout is checked against our own, independent Hugging Face loader: the adapter merged
into the HF state dict (W + scaling * B @ A, as PEFT's merge_and_unload does) and loaded with
`llama_params_from_state_dict` / `gpt2_params_from_state_dict` must differ from the base
params, kernel by kernel and layer by layer, by exactly `a[l] @ b[l]`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hf_reference import flax_to_torch_state_dict, random_flax_model, write_checkpoint
from lora_utils import (
    LLAMA,
    LLAMA_MODULES,
    layer_prefix,
    merge_into_state_dict,
    write_peft_adapter,
)
from safetensors.numpy import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import FlaxGPT2LMHeadModel, FlaxLlamaForCausalLM  # noqa: E402

from models.config import get_config  # noqa: E402
from models.loaders import (  # noqa: E402
    config_from_hf_json,
    gpt2_params_from_state_dict,
    llama_params_from_state_dict,
)
from models.loaders.peft_lora import LoRAWeights, load_peft_lora  # noqa: E402

GPT2 = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
RTOL = 1e-5


def _kernel(params, target: str) -> np.ndarray:
    layers = params["layers"]
    return np.asarray(
        (layers["mlp"] if target in ("gate", "up", "down") else layers)[target]["kernel"]
    )


def _flat(kernel: np.ndarray, target: str) -> np.ndarray:
    """Our kernel [L, in..., out...] as [L, D_in, D_out] (only o has two input axes)."""
    n_in = 2 if target == "o" else 1
    L, shape = kernel.shape[0], kernel.shape[1:]
    return kernel.reshape(L, int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:])))


def check_merged_delta(lora: LoRAWeights, base, merged, want_targets: set[str]) -> None:
    """`merged - base` is `a[l] @ b[l]` for every adapted kernel and layer, zero elsewhere."""
    assert set(lora.targets) == want_targets
    for target in ("q", "k", "v", "o", "gate", "up", "down"):
        if target == "gate" and "gate" not in base["layers"]["mlp"]:
            continue  # GPT-2
        delta = _flat(_kernel(merged, target), target) - _flat(_kernel(base, target), target)
        if target not in want_targets:
            assert not delta.any(), target
            continue
        a, b = lora.targets[target]
        assert a.dtype == b.dtype == np.float32
        assert a.shape == (delta.shape[0], delta.shape[1], lora.rank), target
        assert b.shape == (delta.shape[0], lora.rank, delta.shape[2]), target
        want = a @ b  # [L, D_in, D_out]
        for layer in range(len(want)):
            scale = np.max(np.abs(want[layer]))
            assert scale > 1e-3, (target, layer)  # the adapter really moves this kernel
            err = np.max(np.abs(delta[layer] - want[layer])) / scale
            assert err < RTOL, (target, layer, err)


def _checkpoint(directory, model_cls, hf_config, to_params):
    """(hf_config, torch-layout state dict, our config, our params) of a random model."""
    sd = flax_to_torch_state_dict(random_flax_model(model_cls, hf_config)[1])
    cfg = write_checkpoint(directory, hf_config, sd)
    return hf_config, sd, cfg, to_params(sd, cfg)


@pytest.fixture(scope="module")
def llama_gqa(tmp_path_factory):
    config = transformers.LlamaConfig(**LLAMA)
    directory = tmp_path_factory.mktemp("llama")
    return _checkpoint(directory, FlaxLlamaForCausalLM, config, llama_params_from_state_dict)


@pytest.fixture(scope="module")
def llama_wide_heads(tmp_path_factory, llama_gqa):
    """head_dim 24: N*H = 96 != D = 64 (o's input is not D). FlaxLlama ignores head_dim, so
    the attention weights are redrawn in the torch shapes such a checkpoint has."""
    hf_config = transformers.LlamaConfig(**LLAMA, head_dim=24)
    sd = dict(llama_gqa[1])
    rng = np.random.default_rng(5)
    D, NH, KH = 64, 4 * 24, 2 * 24
    shapes = {"q_proj": (NH, D), "k_proj": (KH, D), "v_proj": (KH, D), "o_proj": (D, NH)}
    for layer in range(hf_config.num_hidden_layers):
        for name, shape in shapes.items():
            key = f"model.layers.{layer}.self_attn.{name}.weight"
            sd[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    cfg = write_checkpoint(tmp_path_factory.mktemp("wide"), hf_config, sd)
    assert cfg.n_heads * cfg.head_dim == 96 != cfg.d_model
    return hf_config, sd, cfg, llama_params_from_state_dict(sd, cfg)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    config = transformers.GPT2Config(**GPT2)
    directory = tmp_path_factory.mktemp("gpt2")
    return _checkpoint(directory, FlaxGPT2LMHeadModel, config, gpt2_params_from_state_dict)


@pytest.mark.parametrize(
    "model,rank,alpha,use_rslora,modules,want",
    [
        ("llama_gqa", 8, 16, False, LLAMA_MODULES, {"q", "k", "v", "o", "gate", "up", "down"}),
        ("llama_gqa", 4, 8, True, ["q_proj", "o_proj", "up_proj"], {"q", "o", "up"}),
        ("llama_gqa", 8, 16, True, ["k_proj", "v_proj", "gate_proj", "down_proj"], None),
        ("llama_wide_heads", 8, 16, False, LLAMA_MODULES, None),
        ("llama_wide_heads", 4, 32, True, ["q_proj", "o_proj"], {"q", "o"}),
    ],
)
def test_llama_adapter_matches_merged_checkpoint(
    model, rank, alpha, use_rslora, modules, want, request, tmp_path
):
    hf_config, sd, cfg, base = request.getfixturevalue(model)
    tensors = write_peft_adapter(
        tmp_path, hf_config, rank=rank, alpha=alpha, targets=modules, use_rslora=use_rslora
    )
    lora = load_peft_lora(str(tmp_path), cfg)
    assert lora.rank == rank
    merged = merge_into_state_dict(sd, tensors, rank=rank, alpha=alpha, use_rslora=use_rslora)
    want = want or {m.removesuffix("_proj") for m in modules}
    check_merged_delta(lora, base, llama_params_from_state_dict(merged, cfg), want)


@pytest.mark.parametrize(
    "rank,alpha,use_rslora,modules,want",
    [
        (8, 16, False, ["c_attn", "c_proj", "c_fc"], {"q", "k", "v", "o", "up", "down"}),
        (4, 8, True, ["c_attn"], {"q", "k", "v"}),  # fused q, k, v: one A, B split by rows
        (8, 8, False, ["c_fc", "mlp.c_proj"], {"up", "down"}),  # not attn.c_proj
    ],
)
def test_gpt2_adapter_matches_merged_checkpoint(
    rank, alpha, use_rslora, modules, want, gpt2, tmp_path
):
    hf_config, sd, cfg, base = gpt2
    tensors = write_peft_adapter(
        tmp_path, hf_config, rank=rank, alpha=alpha, targets=modules, use_rslora=use_rslora
    )
    lora = load_peft_lora(str(tmp_path), cfg)
    merged = merge_into_state_dict(sd, tensors, rank=rank, alpha=alpha, use_rslora=use_rslora)
    check_merged_delta(lora, base, gpt2_params_from_state_dict(merged, cfg), want)


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """A Llama config and ours, without weights (for what needs no base model)."""
    hf_config = transformers.LlamaConfig(**LLAMA)
    directory = tmp_path_factory.mktemp("config")
    (directory / "config.json").write_text(hf_config.to_json_string())
    return hf_config, config_from_hf_json(str(directory))


def test_partial_targets_layout(small_llama, tmp_path):
    """Only q and v: exactly those targets, a = A^T and b = scaling * B^T in every layer."""
    hf_config, cfg = small_llama
    tensors = write_peft_adapter(
        tmp_path, hf_config, rank=4, alpha=12, targets=["q_proj", "v_proj"]
    )
    lora = load_peft_lora(str(tmp_path), cfg)
    assert list(lora.targets) == ["q", "v"]
    (qa, qb), (va, vb) = lora.targets["q"], lora.targets["v"]
    assert qa.shape == va.shape == (2, 64, 4)
    assert qb.shape == (2, 4, 4 * 16) and vb.shape == (2, 4, 2 * 16)
    for layer in range(2):
        key = layer_prefix(hf_config, layer) + "self_attn.v_proj"
        np.testing.assert_array_equal(va[layer], tensors[f"{key}.lora_A.weight"].T)
        np.testing.assert_allclose(vb[layer], 3.0 * tensors[f"{key}.lora_B.weight"].T, rtol=1e-6)


def _rewrite(path, *, edit_config=None, edit_tensors=None) -> None:
    """Edit an adapter directory in place: its config dict and/or its tensors dict."""
    if edit_config:
        ac = json.loads((path / "adapter_config.json").read_text())
        edit_config(ac)
        (path / "adapter_config.json").write_text(json.dumps(ac))
    if edit_tensors:
        tensors = load_file(str(path / "adapter_model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(path / "adapter_model.safetensors"))


def test_skipped_layers_are_zero_and_absent_targets_left_out(small_llama, tmp_path):
    hf_config, cfg = small_llama
    tensors = write_peft_adapter(tmp_path, hf_config, rank=8, alpha=8, targets=["q_proj", "o_proj"])
    full = load_peft_lora(str(tmp_path), cfg)
    layer0 = layer_prefix(hf_config, 0)

    def keep_q_in_layer_1(t: dict) -> None:
        for key in tensors:
            if key.startswith(layer0) or ".o_proj." in key:
                del t[key]

    _rewrite(
        tmp_path,
        edit_config=lambda ac: ac.update(layers_to_transform=[1]),
        edit_tensors=keep_q_in_layer_1,
    )
    lora = load_peft_lora(str(tmp_path), cfg)
    assert list(lora.targets) == ["q"]  # o is in no layer: left out
    (a, b), (full_a, full_b) = lora.targets["q"], full.targets["q"]
    assert not a[0].any() and not b[0].any()
    assert a[1].any() and b[1].any()
    np.testing.assert_array_equal(a[1], full_a[1])
    np.testing.assert_array_equal(b[1], full_b[1])


def test_default_adapter_name_segment_is_stripped(small_llama, tmp_path):
    hf_config, cfg = small_llama
    write_peft_adapter(tmp_path, hf_config, rank=4, alpha=8, targets=["k_proj", "down_proj"])
    want = load_peft_lora(str(tmp_path), cfg)

    def rename(t: dict) -> None:
        for key in list(t):
            t[key.replace(".weight", ".default.weight")] = t.pop(key)

    _rewrite(tmp_path, edit_tensors=rename)
    assert all(".default." in k for k in load_file(str(tmp_path / "adapter_model.safetensors")))
    got = load_peft_lora(str(tmp_path), cfg)
    assert list(got.targets) == list(want.targets) == ["k", "down"]
    for target, (a, b) in want.targets.items():
        np.testing.assert_array_equal(got.targets[target][0], a)
        np.testing.assert_array_equal(got.targets[target][1], b)


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
Q1 = "base_model.model.model.layers.1.self_attn.q_proj"
ZEROS_A, ZEROS_B = np.zeros((8, 64), np.float32), np.zeros((64, 8), np.float32)


def _remove(name: str):
    return lambda path: os.remove(path / name)


def _config(**changes):
    return lambda path: _rewrite(path, edit_config=lambda ac: ac.update(changes))


def _tensors(**changes):
    """Set (array) or delete (None) tensors; keys are given with "/" for "."."""

    def edit(t: dict) -> None:
        for key, value in changes.items():
            key = key.replace("/", ".")
            if value is None:
                del t[key]
            else:
                t[key] = value

    return lambda path: _rewrite(path, edit_tensors=edit)


def _only_bin(path) -> None:
    os.remove(path / "adapter_model.safetensors")
    (path / "adapter_model.bin").write_bytes(b"")


def _q_layer_2(path) -> None:
    def copy(t: dict) -> None:
        for ab in "AB":
            t[f"{Q0}.lora_{ab}.weight".replace("layers.0", "layers.2")] = t[
                f"{Q0}.lora_{ab}.weight"
            ]

    _rewrite(path, edit_tensors=copy)


def _slashes(key: str) -> str:
    return key.replace(".", "/")


ERRORS = {
    "no config": (_remove("adapter_config.json"), r"no adapter_config\.json"),
    "no weights": (_remove("adapter_model.safetensors"), r"adapter_model\.safetensors.*\.bin"),
    "bin only": (_only_bin, r"no adapter_model\.safetensors \(found \['adapter_model\.bin'\]\)"),
    "dora": (_config(use_dora=True), "use_dora"),
    "bias": (_config(bias="lora_only"), "bias 'lora_only' is not supported"),
    "modules_to_save": (_config(modules_to_save=["lm_head"]), r"modules_to_save \['lm_head'\]"),
    "rank_pattern": (_config(rank_pattern={"q_proj": 4}), "rank_pattern"),
    "peft_type": (_config(peft_type="IA3"), "peft_type 'IA3'"),
    "target_modules": (
        _config(target_modules=["q_proj", "embed_tokens", "lm_head"]),
        r"cannot apply: \['embed_tokens', 'lm_head'\]",
    ),
    "lm_head tensors": (
        _tensors(**{"base_model/model/lm_head/lora_A/weight": ZEROS_A}),
        r"cannot apply: \['lm_head'\]",
    ),
    "embedding tensors": (
        _tensors(**{"base_model/model/model/embed_tokens/lora_embedding_A": ZEROS_A}),
        r"cannot apply: \['model\.embed_tokens'\]",
    ),
    "unknown module": (
        _tensors(**{_slashes(Q0.replace("q_proj", "rotary_emb")) + "/lora_A/weight": ZEROS_A}),
        r"cannot apply: \['model\.layers\.0\.self_attn\.rotary_emb'\]",
    ),
    "unexpected tensor": (
        _tensors(**{"base_model/model/model/norm/weight": np.ones(64, np.float32)}),
        r"unexpected tensors in adapter_model\.safetensors: \['base_model\.model\.model\.norm",
    ),
    "A shape": (
        _tensors(**{_slashes(Q0) + "/lora_A/weight": np.zeros((8, 65), np.float32)}),
        r"layers\.0\.self_attn\.q_proj\.lora_A\.weight: shape \(8, 65\) .* want \(8, 64\)",
    ),
    "B shape": (
        _tensors(**{_slashes(Q1) + "/lora_B/weight": np.zeros((32, 8), np.float32)}),
        r"layers\.1\.self_attn\.q_proj\.lora_B\.weight: shape \(32, 8\) .* want \(64, 8\)",
    ),
    "r in config": (_config(r=16), r"lora_A\.weight has rank 8 but adapter_config\.json says r=16"),
    "rank of one key": (
        _tensors(**{_slashes(Q1) + "/lora_B/weight": np.zeros((64, 4), np.float32)}),
        r"layers\.1\.self_attn\.q_proj\.lora_B\.weight has rank 4 .* r=8",
    ),
    "missing B": (
        _tensors(**{_slashes(Q1) + "/lora_B/weight": None}),
        r"layers\.1\.self_attn\.q_proj\.lora_A\.weight has no matching lora_B",
    ),
    "layer out of range": (_q_layer_2, r"layers\.2\.self_attn\.q_proj.*layer 2 out of range"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_name_the_problem_and_the_path(case, small_llama, tmp_path):
    hf_config, cfg = small_llama
    write_peft_adapter(tmp_path, hf_config, rank=8, alpha=16, targets=["q_proj", "o_proj"])
    load_peft_lora(str(tmp_path), cfg)  # valid before the edit
    edit, match = ERRORS[case]
    edit(tmp_path)
    with pytest.raises(ValueError, match=match) as err:
        load_peft_lora(str(tmp_path), cfg)
    assert str(tmp_path) in str(err.value)


def test_adapter_for_another_family_or_an_unknown_one(small_llama, tmp_path):
    hf_config, cfg = small_llama
    write_peft_adapter(tmp_path, hf_config, rank=8, alpha=16, targets=["q_proj"])
    with pytest.raises(ValueError, match=r"cannot apply: \['q_proj'\]"):
        load_peft_lora(str(tmp_path), get_config("tiny-gpt"))
    with pytest.raises(ValueError, match="no LoRA mapping for position=rope, activation=gelu"):
        load_peft_lora(str(tmp_path), cfg.replace(activation="gelu"))
