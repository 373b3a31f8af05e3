"""The command line as a user runs it: the README's main job, and beam search."""

import os
import subprocess
import sys


def _generate(*flags: str, check: bool) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orca_jax.generate", *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        check=check,
    )


def _run(*flags: str) -> list[str]:
    return _generate(*flags, check=True).stdout.strip().splitlines()


def _run_failing(*flags: str) -> subprocess.CompletedProcess:
    """A run expected to fail: its return code and stderr to check."""
    return _generate(*flags, check=False)


def test_main_job_answers():
    lines = _run("--model=smollm2-135m", "--prompt=What is the capital of France?", "--chat")
    assert "Paris" in lines[-1], lines


def test_beam_search_prints_the_best_beams_first():
    # vLLM's dashed spellings are taken too
    lines = _run("--prompt=The capital of France is", "--beam-width=3", "--max-tokens=6")
    scores = [float(line.split()[1]) for line in lines]
    assert len(lines) == 3 and scores == sorted(scores, reverse=True), lines
    assert "Paris" in lines[0], lines


def test_speculative_config_flag_keeps_the_answer():
    question = ("--prompt=What is the capital of France?", "--chat", "--max_tokens=24")
    plain = _run(*question)
    spec = _run(*question, '--speculative-config={"method": "ngram", "num_speculative_tokens": 3}')
    assert spec == plain and "Paris" in spec[-1], (spec, plain)
    bad = _run_failing("--prompt=hi", "--speculative_config={k: 1")
    assert bad.returncode != 0 and "not JSON" in bad.stderr, bad.stderr[-500:]


def test_kv_cache_dtype_and_layer_unroll_flags():
    lines = _run(
        "--prompt=What is the capital of France?",
        "--chat",
        "--kv-cache-dtype=fp8",
        "--layer-unroll=2",  # 30 layers: a loop of 15 iterations, two layers each
    )
    assert "Paris" in lines[-1], lines
    bad = _run_failing("--prompt=hi", "--kv_cache_dtype=fp4")
    assert bad.returncode == 1 and "kv_cache_dtype" in bad.stderr, bad.stderr[-500:]
    bad = _run_failing("--prompt=hi", "--attention-options=splits=4")
    assert bad.returncode == 1 and "attention option 'splits=4'" in bad.stderr, bad.stderr[-500:]
    assert "Traceback" not in bad.stderr
