"""The scheduling core is pure Python: importing it loads neither JAX nor numpy."""

import subprocess
import sys


def test_scheduler_imports_no_tensor_library():
    code = (
        "import sys, orca_jax.scheduler as s; "
        "s.make_scheduler(s.SchedulerConfig()); "
        "bad = [m for m in ('jax', 'numpy', 'flax') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
