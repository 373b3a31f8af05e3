"""Two local processes through jax.distributed: process 0 schedules and broadcasts each step,
the step spans both processes' devices, and the tokens (and prompt scores) equal one
process's."""

import json
import os
import socket
import subprocess
import sys

from parallel_utils import ENGINE_KW, MODEL, PROMPTS, SEED, assert_same_outputs, greedy_outputs

from models import init_params
from orca_jax import Engine, EngineConfig

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    coordinator = f"127.0.0.1:{_free_port()}"
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, coordinator, str(i), str(outs[i])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    leader, follower = (json.loads(o.read_text()) for o in outs)

    params = init_params(MODEL, seed=SEED)
    alone = greedy_outputs(Engine(MODEL, params, None, EngineConfig(**ENGINE_KW)), PROMPTS, 10)
    assert_same_outputs(leader["outputs"], alone)  # tokens, and prompt scores (broadcast too)
    assert leader["process_count"] == follower["process_count"] == 2
    assert leader["cache_processes"] == [0, 1]  # the KV pages live on both processes' devices
    assert follower["steps"] == leader["steps"] > 0  # the follower ran every step
