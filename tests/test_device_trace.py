"""experiments/device_trace.py: kernel times read back from a profiler trace."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import device_trace  # noqa: E402
from device_trace import KernelEvent  # noqa: E402


def test_family_drops_xla_numbering_only():
    assert device_trace.family("loop_add_fusion_12") == "loop_add_fusion"
    assert device_trace.family("gemm_fusion_dot_general_145") == "gemm_fusion_dot_general"
    assert device_trace.family("fusion.3") == "fusion"
    assert device_trace.family("memcpy128") == "memcpy128"
    name = "ragged_paged_attention_bq16_kv128_ns1"
    assert device_trace.family(name) == name


def test_per_call_is_median_duration_times_launches_per_call():
    events = [KernelEvent("a", i, d) for i, d in enumerate([10.0, 11.0, 500.0, 12.0])]
    events += [KernelEvent("b", 9, 7.0), KernelEvent("b", 10, 9.0)]
    got = device_trace.per_call(events, calls=2)
    # a: median 11.5 ns (the 500 ns outlier does not count), launched twice per call
    assert got == pytest.approx({"a": 11.5 * 2 * 1e-9, "b": 8.0 * 1e-9})


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's trace has no device plane")
def test_cpu_trace_has_no_device_kernels():
    f = jax.jit(lambda x: jnp.sin(x) * 2)
    x = jnp.ones(1024)
    assert device_trace.device_time_per_call(f, [(x,)], calls=3) is None
