"""experiments/bench_step.py --variants: a variant that fails costs only its own row.

Run in a subprocess: bench_step defines absl flags at import (`dtype`, ...) that other
modules imported by this test session define too.
"""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")

SCRIPT = """
import sys
sys.path.insert(0, "experiments")
import bench_step
from models import get_config

class Case:
    cfg = get_config("tiny-gpt")
    floor = 1e-3

    def time(self, cfg):
        if dict(cfg.attention_options).get("one_loop"):
            raise RuntimeError("Triton: out of shared memory\\nsecond line")
        return (2.5e-3, 2e-3)

for name in ("unrolled", "unrolled_1loop", "unrolled_linear"):
    print(bench_step.variant_row(Case(), name))
"""


def test_a_failing_variant_gets_its_error_and_the_rest_still_run():
    got = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert got == [
        "| unrolled | layer_unroll=all | 2.500 | 2.000 | 2.00x |",
        "| unrolled_1loop | layer_unroll=all, attention_options={'one_loop': True} | "
        "failed: RuntimeError: Triton: out of shared memory | | |",
        "| unrolled_linear | layer_unroll=all, fused_linear=True | 2.500 | 2.000 | 2.00x |",
    ]
