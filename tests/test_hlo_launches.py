"""experiments/hlo_launches.py: the kernels an optimized HLO module launches."""
# ruff: noqa: E501 (HLO lines as XLA writes them)

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import hlo_launches  # noqa: E402

# Lines cut from a gpt2 step compiled offline for an H100 (offline_gpu_hlo.py); the Triton
# IR and metadata dropped.
GPU_MODULE = """HloModule jit_step

%fused_slice (p: bf16[12,12,64,768]) -> bf16[1,12,64,768] {
  %p = bf16[12,12,64,768]{3,2,1,0} parameter(0)
  ROOT %s = bf16[1,12,64,768]{3,2,1,0} slice(%p), slice={[0:1], [0:12], [0:64], [0:768]}
}

%fused_dot (x: bf16[128,12,64], w: bf16[768,768]) -> bf16[128,768] {
  %x = bf16[128,12,64]{2,1,0} parameter(0)
  %b = bf16[128,768]{1,0} bitcast(%x)
  %w = bf16[768,768]{1,0} parameter(1)
  ROOT %d = bf16[128,768]{1,0} dot(%b, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_dynamic_slice.4.clone (a: bf16[12,768,12,64], i: s32[]) -> bf16[1,768,12,64] {
  %a = bf16[12,768,12,64]{3,2,1,0} parameter(0)
  %i = s32[] parameter(1)
  ROOT %d = bf16[1,768,12,64]{3,2,1,0} dynamic-slice(%a, %i), dynamic_slice_sizes={1,768,12,64}
}

ENTRY %main.62 (w: bf16[12,12,64,768], q: bf16[128,12,64], k: bf16[12,12,4225,16,64], v: bf16[12,12,4225,16,64], wq: bf16[12,768,12,64], i: s32[]) -> bf16[128,768] {
  %w = bf16[12,12,64,768]{3,2,1,0} parameter(0)
  %q = bf16[128,12,64]{2,1,0} parameter(1)
  %k = bf16[12,12,4225,16,64]{4,3,2,1,0} parameter(2)
  %v = bf16[12,12,4225,16,64]{4,3,2,1,0} parameter(3)
  %wq = bf16[12,768,12,64]{3,2,1,0} parameter(4)
  %i = s32[] parameter(5)
  %pallas_call.96 = (bf16[128,12,64]{2,1,0}, bf16[12,12,4225,16,64]{4,3,2,1,0}, bf16[12,12,4225,16,64]{4,3,2,1,0}) custom-call(%q, %k, %v), custom_call_target="__gpu$xla.gpu.triton", output_to_operand_aliasing={{1}: (1, {}), {2}: (2, {})}, api_version=API_VERSION_TYPED_FFI, backend_config={debug = false, grid_x = 136 : i32, grid_y = 12 : i32, grid_z = 1 : i32, ir = "ML", name = "ragged_paged_attention_bq16_16_kv128_ns1_write", num_stages = 3 : i32, num_warps = 4 : i32}
  %get-tuple-element.9 = bf16[128,12,64]{2,1,0} get-tuple-element(%pallas_call.96), index=0
  %wrapped_slice.3 = bf16[1,12,64,768]{3,2,1,0} fusion(%w), kind=kLoop, calls=%fused_slice
  %fusion-start.4 = ((bf16[12,768,12,64]{3,2,1,0}, s32[]), bf16[1,768,12,64]{3,2,1,0}, u32[]) fusion-start(%wq, %i), kind=kLoop, calls=%fused_dynamic_slice.4.clone
  %fusion-done.4 = bf16[1,768,12,64]{3,2,1,0} fusion-done(%fusion-start.4)
  %bitcast.1 = bf16[768,768]{1,0} bitcast(%wrapped_slice.3)
  ROOT %gemm_fusion_dot.73 = bf16[128,768]{1,0} fusion(%get-tuple-element.9, %bitcast.1), kind=kCustom, calls=%fused_dot
}
"""


def test_gpu_module_kernels_named_sized_and_moves_found():
    got = hlo_launches.launches(GPU_MODULE)
    assert [x.family for x in got] == [
        "ragged_paged_attention_bq16_16_kv128_ns1_write",
        "wrapped_slice",
        "fused_dynamic_slice",
        "gemm_fusion_dot",
    ]
    attention, sliced, dynamic, gemm = got
    assert attention.op == "custom-call" and attention.kind == "__gpu$xla.gpu.triton"
    assert attention.grid == (136, 12, 1)
    assert attention.out_bytes == 128 * 12 * 64 * 2  # the caches it updates in place: not out
    assert sliced.kind == "kLoop" and sliced.out_bytes == 12 * 64 * 768 * 2
    assert dynamic.op == "fusion-start" and dynamic.out_bytes == 768 * 12 * 64 * 2
    assert gemm.kind == "kCustom" and gemm.grid is None and gemm.out_bytes == 128 * 768 * 2
    assert [x.moves_only for x in got] == [False, True, True, False]
    assert hlo_launches.counts(got)[0][1] == 1


def test_array_bytes_and_aliasing():
    assert (
        hlo_launches.array_bytes("(bf16[2,3]{1,0}, s32[], pred[4], f8e4m3fn[8])") == 12 + 4 + 4 + 8
    )
    assert hlo_launches.array_bytes("(f32[4], u8[16])", skip=frozenset({0})) == 16
    line = "x = f32[4] custom-call(%a), output_to_operand_aliasing={{}: (0, {})}, api_version=1"
    assert hlo_launches.aliased_outputs(line) == {0}
    assert hlo_launches.aliased_outputs("x = f32[4] custom-call(%a), api_version=1") == set()


def test_loop_body_repeats_by_trip_count_and_is_one_period():
    """A CPU-compiled module has the same structure: the loop's body stands in its place,
    each launch repeated by the known trip count."""

    def f(x, w):
        return jax.lax.fori_loop(0, 5, lambda i, x: jnp.tanh(x @ w[i]) + 1.0, x)

    hlo = jax.jit(f).lower(jnp.ones((8, 16)), jnp.ones((5, 16, 16))).compile().as_text()
    got = hlo_launches.launches(hlo)
    assert not any(x.op == "while" for x in got)
    body = [x for x in got if x.repeat == 5]
    assert body and all(x.repeat in (1, 5) for x in got)
    per_step = dict(hlo_launches.counts(got))
    assert sum(per_step.values()) == sum(x.repeat for x in got)
    # a marker launched once, in the loop (XLA's copies run both inside and outside it)
    families = [x.family for x in got]
    (marker,) = [x.family for x in body if families.count(x.family) == 1][:1]
    assert hlo_launches.one_period(got, marker) == body


def test_one_period_of_an_unrolled_step_is_its_second_layer():
    def launch(name):
        return hlo_launches.Launch(name, "fusion", "kLoop", 0)

    names = ["embed", "attn.1", "gemm.1", "add.1", "attn.2", "gemm.2", "add.2", "attn.3", "head"]
    got = hlo_launches.one_period([launch(n) for n in names], "attn")
    assert [x.name for x in got] == ["attn.2", "gemm.2", "add.2"]
    two = [launch("attn.1"), launch("x"), launch("attn.2"), launch("y")]
    assert [x.name for x in hlo_launches.one_period(two, "attn")] == ["attn.1", "x"]
    assert hlo_launches.one_period([launch("x")], "attn") == []
