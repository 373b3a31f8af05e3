"""After warm-up, steps on already-seen buckets trace and compile nothing."""

import numpy as np

from models import get_config, init_params
from orca_jax.runner import ModelRunner, RunnerConfig
from orca_jax.utils.compilation import count_compiles


def _runner(name: str = "tiny-llama"):
    # A distinct config name gives each test its own jit cache entries.
    cfg = get_config("tiny-llama").replace(name=name)
    rc = RunnerConfig(
        num_pages=64,
        page_size=4,
        max_num_tokens=32,
        max_num_reqs=8,
        max_model_len=64,
        min_token_bucket=8,
        min_req_bucket=4,
        min_pages_bucket=16,
    )
    return ModelRunner(cfg, init_params(cfg), rc)


def test_warmed_up_steps_compile_nothing():
    runner = _runner()
    assert runner.config.all_buckets() == [
        (8, 4, 16),
        (8, 8, 16),
        (16, 4, 16),
        (16, 8, 16),
        (32, 4, 16),
        (32, 8, 16),
    ]
    runner.warmup()
    rng = np.random.default_rng(0)
    with count_compiles() as counts:
        for _ in range(12):
            n = int(rng.integers(1, 8))
            seqs = []
            page = 1
            for _ in range(n):
                q = int(rng.integers(1, 4))
                start = int(rng.integers(0, 20))
                pages = -(-(start + q) // 4)
                seqs.append(
                    (rng.integers(0, 256, q).tolist(), start, list(range(page, page + pages)))
                )
                page += pages
            logits = runner.run(seqs)
            assert logits.shape == (n, 256) and np.isfinite(logits).all()
    assert (counts.traces, counts.compiles) == (0, 0)


def test_counter_sees_a_new_bucket():
    """The counter is live: a shape outside the warmed buckets does compile."""
    runner = _runner("tiny-llama-counter")
    runner.warmup([(8, 4, 16)])
    with count_compiles() as counts:
        runner.run([([1] * 9, 0, [1, 2, 3])])  # 9 tokens -> bucket 16, not warmed
    assert counts.compiles >= 1
