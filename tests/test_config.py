"""Presets and the parameter accounting used for memory planning."""

import jax
import numpy as np
import pytest

from models import PRESETS, get_config, init_kv_cache, param_shapes
from models.kv_cache import num_pages_for_memory


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
    with pytest.raises(ValueError, match="layer_unroll must be >= 1"):
        get_config("tiny-gpt", layer_unroll=0)


def test_kv_cache_dtype_sets_the_bytes_and_pages_per_token():
    bf16 = get_config("smollm2-135m", dtype="bfloat16")
    fp8 = bf16.replace(kv_cache_dtype="fp8")
    assert (bf16.cache_dtype, fp8.cache_dtype) == ("bfloat16", "float8_e4m3fn")
    assert fp8.replace(kv_cache_dtype="fp8_e5m2").cache_dtype == "float8_e5m2"
    # 30 layers x 3 kv heads x 64 x (K and V): 23040 bytes per token in bf16, half in fp8.
    assert bf16.kv_bytes_per_token() == 2 * 30 * 3 * 64 * 2 == 2 * fp8.kv_bytes_per_token()
    fp8_gpt2 = get_config("gpt2", kv_cache_dtype="fp8")  # float32 model: a quarter
    assert get_config("gpt2").kv_bytes_per_token() == 4 * fp8_gpt2.kv_bytes_per_token()
    mib = 256 * 2**20
    assert num_pages_for_memory(fp8, 16, mib) == 2 * num_pages_for_memory(bf16, 16, mib)
    cache = init_kv_cache(fp8, num_pages=4, page_size=16)
    assert cache.k.dtype == cache.v.dtype == np.uint8  # fp8 bits (see cache_codec)
    assert cache.k.nbytes == 4 * 16 * fp8.kv_bytes_per_token() // 2
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto, fp8"):
        get_config("gpt2", kv_cache_dtype="int4")


def test_attention_options_are_checked_sorted_and_hashable():
    cfg = get_config("tiny-gpt", attention_options={"one_launch": True, "fuse_kv_write": True})
    assert cfg.attention_options == (("fuse_kv_write", True), ("one_launch", True))
    assert cfg == get_config(
        "tiny-gpt", attention_options=(("one_launch", True), ("fuse_kv_write", True))
    )
    hash(cfg)  # a jit static argument
    with pytest.raises(ValueError, match="unknown attention option 'splits'"):
        get_config("tiny-gpt", attention_options={"splits": 4})


def test_attention_options_from_a_flag():
    from models.config import parse_attention_options

    assert parse_attention_options("") == {}
    assert parse_attention_options("one_launch=true, num_kv_splits=4") == {
        "one_launch": True,
        "num_kv_splits": 4,
    }
    with pytest.raises(ValueError, match="want name=value"):
        parse_attention_options("one_launch")
    with pytest.raises(ValueError, match="integer or bool"):
        parse_attention_options("block_kv=big")
