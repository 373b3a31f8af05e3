"""The Pallas kernel per head shard under shard_map equals the unsharded reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.ragged_paged_attention import ragged_paged_attention_ref
from pallas_kernels.ragged_paged_attention.kernel import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.sharded import shard_over_heads


def _batch(rng, K=4, G=2, H=32, S=16, P_=24, L=2):
    # Two prefills and three decodes, contexts ending mid-page; one padding request.
    q_lens = np.array([7, 20, 1, 1, 1, 0], np.int32)
    kv_lens = np.array([7, 35, 18, 49, 3, 0], np.int32)
    pages = rng.permutation(np.arange(1, P_))
    tables = np.zeros((6, 4), np.int32)
    used = 0
    for r, n in enumerate(-(-kv_lens // S)):
        tables[r, :n] = pages[used : used + n]
        used += n
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    T = 32
    q = rng.standard_normal((T, K * G, H)).astype(np.float32)
    k = rng.standard_normal((L, K, P_, S, H)).astype(np.float32)
    v = rng.standard_normal((L, K, P_, S, H)).astype(np.float32)
    meta = (np.int32(1), kv_lens, tables, cu, np.int32(5))
    return q, k, v, meta


@pytest.mark.parametrize("shards", [2, 4])
def test_kernel_per_head_shard_matches_reference(shards):
    mesh = jax.make_mesh((8 // shards, shards), ("data", "model"))
    q, k, v, meta = _batch(np.random.default_rng(shards))
    scale = q.shape[-1] ** -0.5
    want = ragged_paged_attention_ref(q, k, v, *meta, sm_scale=scale)
    qs = jax.device_put(q, NamedSharding(mesh, P(None, "model", None)))
    cs = NamedSharding(mesh, P(None, "model", None, None, None))
    ks, vs = jax.device_put(k, cs), jax.device_put(v, cs)
    attn = shard_over_heads(ragged_paged_attention, mesh)
    got = jax.jit(lambda *a: attn(*a, sm_scale=scale, interpret=True))(qs, ks, vs, *meta)
    assert got.sharding.spec == P(None, "model", None)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    assert (np.asarray(got)[int(meta[3][5]) :] == 0).all()  # padding rows stay zero


def test_heads_must_divide_the_axis():
    mesh = jax.make_mesh((1, 8), ("data", "model"))
    q, k, v, meta = _batch(np.random.default_rng(0))
    attn = shard_over_heads(ragged_paged_attention_ref, mesh)
    with pytest.raises(ValueError, match="4 KV heads cannot be split over 8"):
        attn(jnp.asarray(q), k, v, *meta, sm_scale=1.0)
