"""The device mesh: one `model` axis over which tensor parallelism splits heads and FFN."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

MODEL_AXIS = "model"


def make_mesh(tensor_parallel: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh of the first `tensor_parallel` devices (of `devices`, default all local)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {tensor_parallel}")
    if tensor_parallel > len(devices):
        raise ValueError(
            f"tensor_parallel={tensor_parallel} needs that many devices; {len(devices)} available"
        )
    return Mesh(np.array(devices[:tensor_parallel]), (MODEL_AXIS,))


def tensor_parallel_size(mesh: Mesh | None) -> int:
    """Shards along the model axis (1 without a mesh)."""
    return 1 if mesh is None else dict(mesh.shape).get(MODEL_AXIS, 1)
