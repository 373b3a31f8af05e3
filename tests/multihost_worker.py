"""One process of the two-process test (tests/test_multihost.py); not a test itself.

python tests/multihost_worker.py COORDINATOR PROCESS_ID OUT_JSON
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

from orca_jax import distributed  # noqa: E402

coordinator, process_id, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
distributed.initialize(coordinator, num_processes=2, process_id=process_id)

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from parallel_utils import ENGINE_KW, MODEL, PROMPTS, SEED, greedy_outputs  # noqa: E402

from models import init_params  # noqa: E402
from orca_jax import Engine, EngineConfig  # noqa: E402

engine = Engine(
    MODEL,
    init_params(MODEL, seed=SEED),
    None,
    EngineConfig(**ENGINE_KW, tensor_parallel_size=jax.device_count(), warmup=False),
)
devices = sorted({d.process_index for d in engine.runner.stages[0].kv_cache.k.sharding.device_set})
if distributed.is_leader():
    try:
        result = {"outputs": greedy_outputs(engine, PROMPTS, 10), "steps": engine.num_iterations}
    finally:
        engine.stop_followers()
else:
    result = {"steps": distributed.follow(engine)}
result |= {"process_count": jax.process_count(), "cache_processes": devices}
with open(out_path, "w") as f:
    json.dump(result, f)
