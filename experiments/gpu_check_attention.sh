#!/usr/bin/env bash
# Ragged paged attention on the GPU: the kernel tests (Triton, not interpret), then the benchmark.
# Run from the repo root on the GPU machine (experiments/gpu_check.sh calls it); writes under $OUT:
#   attention_tests.log, attention_bench.log, attention.md (the table). Prints a summary last.
# Budget: about 2-3 minutes, mostly Triton and XLA compiles.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH=.
# tests/conftest.py defaults JAX to the CPU; ask for the GPU explicitly (override only to try
# this script elsewhere, e.g. GPU_CHECK_PLATFORM=cpu BENCH_FLAGS=--small).
export JAX_PLATFORMS="${GPU_CHECK_PLATFORM:-cuda}"
PY="${PYTHON:-python3}"

nvidia-smi -L 2>/dev/null | head -1
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1

start=$(date +%s)
timeout 300 "$PY" -m pytest tests/kernels/test_ragged_paged_attention.py -q -x -p no:cacheprovider \
  -W ignore::DeprecationWarning >"$OUT/attention_tests.log" 2>&1
test_rc=$?
mid=$(date +%s)
timeout 300 "$PY" experiments/bench_attention.py --out "$OUT/attention.md" ${BENCH_FLAGS:-} \
  >"$OUT/attention_bench.log" 2>&1
bench_rc=$?
end=$(date +%s)

echo "=== attention tests (rc=$test_rc, $((mid - start)) s): $OUT/attention_tests.log"
grep -E "passed|failed|error" "$OUT/attention_tests.log" | tail -5
[ "$test_rc" -ne 0 ] && grep -E "^(FAILED|ERROR|E )" "$OUT/attention_tests.log" | head -20
echo "=== attention bench (rc=$bench_rc, $((end - mid)) s): $OUT/attention_bench.log"
if [ -s "$OUT/attention.md" ]; then cat "$OUT/attention.md"; fi
[ "$bench_rc" -ne 0 ] && tail -15 "$OUT/attention_bench.log"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
