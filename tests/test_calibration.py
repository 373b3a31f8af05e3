"""Fitting the simulator's cost model to measured step times (no JAX)."""

import json
import os
import subprocess
import sys

import pytest

from models import get_config
from orca_jax.calibration import Calibration, fit, predict
from orca_jax.simulate import CostModel, Hardware

GPT2 = get_config("gpt2", dtype="bfloat16")
MACHINE = Hardware("test machine", 80e9, 2e12, 400e12, 1e11)
SHAPES = [
    [(1, 129)] * 8,  # decodes: bytes-bound
    [(1, 513)] * 64,
    [(1, 1025)] * 128,
    [(512, 512)],  # prefills: FLOP-bound
    [(1024, 1024)] * 2,
    [(256, 256)] + [(1, 300)] * 30,  # mixed
]


def test_fit_recovers_the_costs_that_made_the_samples():
    truth = CostModel(
        GPT2, MACHINE, bandwidth_efficiency=10**-0.5, flops_efficiency=10**-1.3, overhead_s=2e-3
    )
    samples = [(shape, predict(truth, shape)) for shape in SHAPES]
    cal = fit(GPT2, MACHINE, samples)
    assert cal.bandwidth_efficiency == pytest.approx(10**-0.5)
    assert cal.flops_efficiency == pytest.approx(10**-1.3)
    assert cal.overhead_s == pytest.approx(2e-3, rel=1e-6)
    assert cal.rms_log_error < 1e-9
    # Off the grid and noisy: still close, and it says how close.
    noisy = [(s, t * (1.1 if i % 2 else 0.92)) for i, (s, t) in enumerate(samples)]
    rough = fit(GPT2, MACHINE, noisy)
    assert 0.05 < rough.rms_log_error < 0.2
    assert rough.bandwidth_efficiency == pytest.approx(10**-0.5, rel=0.3)


def test_calibration_round_trips_and_costs_other_models():
    cal = Calibration(MACHINE, 0.5, 0.25, 1e-3, 0.07)
    again = Calibration.from_json(cal.to_json())
    assert again == cal
    big = again.cost_model(get_config("gpt3-13b", dtype="bfloat16"), tp=2)
    assert (big.hw, big.tp, big.bandwidth_efficiency, big.overhead_s) == (MACHINE, 2, 0.5, 1e-3)


def test_fit_needs_enough_positive_samples():
    with pytest.raises(ValueError, match="at least 3"):
        fit(GPT2, MACHINE, [(SHAPES[0], 1e-3)])
    with pytest.raises(ValueError, match="> 0"):
        fit(GPT2, MACHINE, [(s, 0.0) for s in SHAPES])


def test_calibrate_script_fits_then_feeds_the_simulated_sweep(tmp_path):
    """experiments/calibrate_simulator.py end to end at a CI size, then its JSON driving
    bench_serving.py --simulate."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "cal.json"
    args = ["--iters=2", "--num_requests=8", "--policies=orca", "--rates=40", f"--out={out}"]
    script = os.path.join(root, "experiments", "calibrate_simulator.py")
    run = subprocess.run(
        [sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| orca | 40 |" in run.stdout and "engine host work" in run.stdout
    cal = Calibration.from_json(out.read_text())
    assert 0 < cal.bandwidth_efficiency <= 1 and 0 < cal.flops_efficiency <= 1
    assert cal.overhead_s > 0 and cal.hw.hbm_bytes_per_s > 0

    sweep = [
        sys.executable,
        os.path.join(root, "experiments", "bench_serving.py"),
        "--simulate",
        f"--calibration={out}",
        "--model=tiny-gpt",
        "--policies=orca,static:4",
        "--rates=20",
        "--num_requests=20",
        f"--out={tmp_path / 'rows.json'}",
    ]
    run = subprocess.run(sweep, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["policy"] for r in rows] == ["orca", "static:4"]
    assert all(r["requests"] == 20 for r in rows)
