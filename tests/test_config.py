"""Presets and the parameter accounting used for memory planning."""

import jax
import numpy as np
import pytest

from models import PRESETS, get_config, param_shapes


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("use_bias", [False, True])
def test_num_params_counts_the_param_tree(name, use_bias):
    cfg = get_config(name, use_bias=use_bias)
    tree = param_shapes(cfg)  # shapes only: even gpt3-341b costs no memory
    assert cfg.num_params() == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_paper_and_known_sizes():
    # GPT-2 124M (tied head), SmolLM2 135M, and the paper's GPT-3 sizes.
    assert round(get_config("gpt2").num_params() / 1e6) == 124
    assert round(get_config("smollm2-135m").num_params() / 1e6) == 135
    for name, billions in [("gpt3-13b", 13), ("gpt3-175b", 175), ("gpt3-341b", 341)]:
        assert abs(get_config(name).num_params() / 1e9 - billions) / billions < 0.03, name


def test_bad_names_and_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        get_config("gpt5")
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        get_config("tiny-llama", n_kv_heads=3)
