"""The device mesh: one `model` axis over which tensor parallelism splits heads and FFN."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

MODEL_AXIS = "model"


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How one model is spread over devices: heads/FFN split `tensor_parallel_size` ways
    within each of `pipeline_parallel_size` stages of consecutive layers."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_devices(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


def make_mesh(tensor_parallel: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh of the first `tensor_parallel` devices (of `devices`; default: all, of every
    process)."""
    devices = list(jax.devices() if devices is None else devices)
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
