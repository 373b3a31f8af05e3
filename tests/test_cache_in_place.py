"""The step updates the donated KV cache in place: aliased, and never copied whole."""

import jax
import pytest

from models import get_config, init_kv_cache, init_params, pack_batch, step

# The kernel storing K/V itself (fuse_kv_write) runs on the GPU only (gpu_check.sh runs this
# file there): on the CPU, interpret mode carries the aliased cache through its loops twice,
# which copies it; the Triton call aliases the cache operands to its outputs (which the
# lowering test in tests/kernels checks without a GPU).
_GPU_ONLY = pytest.mark.skipif(
    jax.default_backend() == "cpu", reason="interpret mode copies an aliased cache"
)


@pytest.mark.parametrize(
    "impl,kv_cache_dtype,unroll,options",
    [
        ("reference", "auto", None, {}),
        # the kernel behind scatters (the GPU's default is the kernel writing K/V)
        ("pallas", "auto", None, {"fuse_kv_write": False}),
        ("reference", "fp8", None, {}),
        ("pallas", "fp8", None, {"fuse_kv_write": False}),
        ("pallas", "auto", 2, {"fuse_kv_write": False}),  # unrolled: no loop carries the cache
        pytest.param("pallas", "auto", None, {"fuse_kv_write": True}, marks=_GPU_ONLY),
        pytest.param("pallas", "fp8", 2, {"fuse_kv_write": True}, marks=_GPU_ONLY),
    ],
)
def test_step_aliases_and_never_copies_the_cache(impl, kv_cache_dtype, unroll, options):
    """fp8 too: its bits live in uint8 because XLA's CPU backend converts a whole fp8 cache
    around a scatter into it (a copy per write, 1000x slower than the write itself)."""
    cfg = get_config(
        "tiny-llama",
        attention_impl=impl,
        kv_cache_dtype=kv_cache_dtype,
        layer_unroll=unroll,
        attention_options=options,
    )
    kv = init_kv_cache(cfg, 64, 16)
    batch = pack_batch(
        [([1, 2, 3], 0, [1]), ([4], 9, [2])],
        page_size=16,
        num_tokens=16,
        num_reqs=8,
        max_blocks=8,
    )
    hlo = step.lower(init_params(cfg), kv, batch, cfg).compile().as_text()
    cache_shape = "[2,2,64,16,16]"  # [L, K, P, S, H], whatever the element type
    assert "input_output_alias" in hlo  # the donated cache buffers are reused for the output
    assert ("u8" + cache_shape in hlo) == (kv_cache_dtype == "fp8")
    whole = [
        line
        for line in hlo.splitlines()
        if cache_shape in line and (" copy(" in line or " convert(" in line)
    ]
    assert whole == []
