"""Round trips of params pytrees through orbax (`orca_jax.checkpoint`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import get_config, init_params
from orca_jax.checkpoint import restore_params, save_params


def _assert_same(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("name", ["tiny-gpt", "tiny-llama"])
def test_round_trip_is_exact(tmp_path, name):
    params = init_params(get_config(name), seed=4)
    save_params(tmp_path / "ckpt", params)
    _assert_same(restore_params(tmp_path / "ckpt"), params)
    _assert_same(restore_params(tmp_path / "ckpt", like=params), params)


def test_bfloat16_tree_and_overwrite(tmp_path):
    params = init_params(get_config("tiny-llama", dtype="bfloat16"))
    save_params(tmp_path / "ckpt", params)
    with pytest.raises(ValueError):
        save_params(tmp_path / "ckpt", params)
    other = init_params(get_config("tiny-llama", dtype="bfloat16"), seed=1)
    save_params(tmp_path / "ckpt", other, overwrite=True)
    _assert_same(restore_params(tmp_path / "ckpt"), other)


def test_restore_casts_and_shards_like_the_target(tmp_path):
    params = init_params(get_config("tiny-llama"))
    save_params(tmp_path / "ckpt", params)
    mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
    sharded = NamedSharding(mesh, PartitionSpec(None, None, "model"))  # q kernel [L, D, N, H]
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
    q = params["layers"]["q"]["kernel"]
    like["layers"]["q"]["kernel"] = jax.ShapeDtypeStruct(q.shape, jnp.bfloat16, sharding=sharded)
    restored = restore_params(tmp_path / "ckpt", like=like)
    assert {x.dtype for x in jax.tree.leaves(restored)} == {jnp.dtype(jnp.bfloat16)}
    assert restored["layers"]["q"]["kernel"].sharding == sharded
    np.testing.assert_array_equal(
        np.asarray(restored["layers"]["q"]["kernel"], np.float32),
        np.asarray(q.astype(jnp.bfloat16), np.float32),
    )
