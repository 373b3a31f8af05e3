"""How K/V values sit in the paged cache: in the compute dtype, or as the bits of fp8.

An fp8 cache (vLLM's `kv_cache_dtype="fp8"`) keeps each value's 8 bits in a uint8 array, as
vLLM does. XLA scatters into uint8 in place on every backend, whereas a scatter into an fp8
array is widened on the CPU and copies the whole cache: 70 ms a write for SmolLM2's 256 MiB
cache, against 0.06 ms into uint8. Readers bitcast the loaded bits to the fp8 type (free)
and widen them to the compute dtype, which is exact: every fp8 value is a bf16/f16/f32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
BITS = jnp.dtype(jnp.uint8)


def storage_dtype(cache_dtype) -> np.dtype:
    """The element type of the cache arrays that hold values of `cache_dtype`."""
    cache_dtype = jnp.dtype(cache_dtype)
    return BITS if cache_dtype in FP8_DTYPES else cache_dtype


def value_dtype(stored_dtype, cache_dtype=None) -> np.dtype:
    """The values' type of a cache stored as `stored_dtype`; uint8 needs `cache_dtype`."""
    stored_dtype = jnp.dtype(stored_dtype)
    if stored_dtype == BITS:
        if cache_dtype is None or jnp.dtype(cache_dtype) not in FP8_DTYPES:
            raise ValueError(
                "a uint8 cache holds fp8 bits: pass cache_dtype=float8_e4m3fn or "
                f"float8_e5m2; got {cache_dtype}"
            )
        return jnp.dtype(cache_dtype)
    if cache_dtype is not None and jnp.dtype(cache_dtype) != stored_dtype:
        raise ValueError(f"cache_dtype {cache_dtype} does not match a {stored_dtype} cache")
    return stored_dtype


def encode(x: jax.Array, cache_dtype) -> jax.Array:
    """`x` as the cache stores it. fp8 saturates at its largest finite value, as vLLM's
    conversion does, rather than turning an outlier into NaN (e4m3) or inf (e5m2)."""
    cache_dtype = jnp.dtype(cache_dtype)
    if cache_dtype not in FP8_DTYPES:
        return x.astype(cache_dtype)
    big = float(jnp.finfo(cache_dtype).max)
    return lax.bitcast_convert_type(jnp.clip(x, -big, big).astype(cache_dtype), BITS)


def round_trip(x: jax.Array, cache_dtype) -> jax.Array:
    """`x` as it reads back from the cache (`decode(encode(x))`), in x's dtype: fp8 rounds
    and saturates; a cache in x's own dtype changes nothing."""
    cache_dtype = jnp.dtype(cache_dtype)
    if cache_dtype not in FP8_DTYPES:
        return x.astype(cache_dtype).astype(x.dtype)
    big = float(jnp.finfo(cache_dtype).max)
    return jnp.clip(x, -big, big).astype(cache_dtype).astype(x.dtype)


def decode(stored: jax.Array, cache_dtype, dtype) -> jax.Array:
    """Loaded cache values in the compute dtype `dtype` (works inside Pallas kernels)."""
    if stored.dtype == BITS:
        stored = lax.bitcast_convert_type(stored, cache_dtype)
    return stored.astype(dtype)
