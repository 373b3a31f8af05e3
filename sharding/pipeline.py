"""Pipeline parallelism: layers cut into stages, each stage on its own group of devices.

Stage s runs layers [start_s, end_s) on a 1-D sub-mesh of `tensor_parallel` devices (its
`model` axis splits heads within the stage, as in `rules.py`). The first stage also embeds the
tokens, the last one applies the final norm and LM head (with tied embeddings the token table
lives on both). Each stage owns the KV pages of its own layers. Activations `[T, D]` move from
stage to stage; JAX dispatches asynchronously, so while stage 1 runs batch i, stage 0 can run
batch i+1 (the engine keeps `n_workers` batches in flight, as the paper's Orca does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from models.config import ModelConfig
from models.layers import Params
from sharding.mesh import MODEL_AXIS


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One pipeline stage: which layers it runs, and where."""

    index: int
    start: int  # first layer (inclusive)
    end: int  # last layer (exclusive)
    mesh: Mesh  # 1-D, axis `model`, the stage's devices
    first: bool
    last: bool

    @property
    def num_layers(self) -> int:
        return self.end - self.start


def layer_ranges(n_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges as even as possible (earlier stages take the extra layers)."""
    if not 1 <= stages <= n_layers:
        raise ValueError(f"pipeline_parallel={stages} must be in [1, n_layers={n_layers}]")
    base, extra = divmod(n_layers, stages)
    bounds = np.cumsum([0] + [base + (s < extra) for s in range(stages)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def plan_stages(
    config: ModelConfig,
    pipeline_parallel: int,
    tensor_parallel: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> list[StagePlan]:
    """Stages over disjoint groups of `tensor_parallel` consecutive devices."""
    devices = list(jax.devices() if devices is None else devices)
    need = pipeline_parallel * tensor_parallel
    if need > len(devices):
        raise ValueError(
            f"pipeline_parallel={pipeline_parallel} x tensor_parallel={tensor_parallel} needs "
            f"{need} devices; {len(devices)} available"
        )
    ranges = layer_ranges(config.n_layers, pipeline_parallel)
    return [
        StagePlan(
            index=s,
            start=start,
            end=end,
            mesh=Mesh(
                np.array(devices[s * tensor_parallel : (s + 1) * tensor_parallel]), (MODEL_AXIS,)
            ),
            first=s == 0,
            last=s == pipeline_parallel - 1,
        )
        for s, (start, end) in enumerate(ranges)
    ]


def stage_params(params: Params, stage: StagePlan, config: ModelConfig) -> Params:
    """The slice of the full params tree that `stage` needs (same paths, fewer layers)."""
    out: Params = {"layers": jax.tree.map(lambda a: a[stage.start : stage.end], params["layers"])}
    if stage.first:
        out["embed"] = params["embed"]
    if stage.last:
        out["final_norm"] = params["final_norm"]
        if config.tie_embeddings:
            out["embed"] = {"tokens": params["embed"]["tokens"]}
        else:
            out["lm_head"] = params["lm_head"]
    if stage.first and stage.last:
        out["embed"] = params["embed"]
    return out
