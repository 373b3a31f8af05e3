"""Fitting the simulator's cost model to step times measured on a machine.

`simulate.CostModel` predicts an iteration from bytes and FLOPs against a `Hardware`'s
ceilings, derated by two efficiencies, plus a fixed overhead. `fit` picks the efficiencies
(on a log grid) and the overhead that best explain measured (batch shape, seconds) samples
in relative terms; a `Calibration` holds the result and reloads as JSON, so a cost model
fitted on one model (say gpt2 on the GPU at hand) can cost another on the same hardware.
No JAX here: measuring is the caller's job (`experiments/calibrate_simulator.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence

from models.config import ModelConfig
from orca_jax.simulate import CostModel, Hardware

# One measured step: the batch as (new tokens, context after them) per request, and seconds.
Sample = tuple[Sequence[tuple[int, int]], float]


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A machine's ceilings and how much of them a model's steps reach."""

    hw: Hardware
    bandwidth_efficiency: float
    flops_efficiency: float
    overhead_s: float
    rms_log_error: float  # of the fit over its samples: 0.1 is about 10% per step

    def cost_model(self, model: ModelConfig, tp: int = 1, pp: int = 1) -> CostModel:
        return CostModel(
            model,
            self.hw,
            tp,
            pp,
            bandwidth_efficiency=self.bandwidth_efficiency,
            flops_efficiency=self.flops_efficiency,
            overhead_s=self.overhead_s,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        d = json.loads(text)
        return cls(**{**d, "hw": Hardware(**d["hw"])})


def predict(cost: CostModel, batch: Sequence[tuple[int, int]]) -> float:
    """Seconds of one iteration of `batch` through every stage, overhead included."""
    return sum(cost.stage_time(batch, s == cost.pp - 1) for s in range(cost.pp)) + cost.overhead_s


def fit(
    model: ModelConfig, hw: Hardware, samples: Sequence[Sample], tp: int = 1, pp: int = 1
) -> Calibration:
    """The efficiencies (a log grid from 1e-4 to 1, ten points per decade) and overhead that
    minimise the root-mean-square log error of the predicted step times.

    For each efficiency pair the overhead is the median of (measured - predicted without
    overhead), floored at 0: robust to a few noisy samples.
    """
    if len(samples) < 3:
        raise ValueError(f"need at least 3 samples to fit 3 numbers; got {len(samples)}")
    measured = [t for _, t in samples]
    if min(measured) <= 0:
        raise ValueError("measured times must be > 0")
    grid = [10 ** (k / 10) for k in range(-40, 1)]
    best = None
    for bw in grid:
        for fl in grid:
            cost = CostModel(model, hw, tp, pp, bw, fl, overhead_s=0.0)
            bare = [predict(cost, batch) for batch, _ in samples]
            pairs = list(zip(bare, measured, strict=True))
            overhead = max(0.0, statistics.median(t - b for b, t in pairs))
            err = math.sqrt(statistics.fmean(math.log((b + overhead) / t) ** 2 for b, t in pairs))
            if best is None or err < best.rms_log_error:
                best = Calibration(hw, bw, fl, overhead, err)
    return best
