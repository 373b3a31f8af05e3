#!/usr/bin/env bash
# Everything GPU-side in one device call of a few minutes:
#   PYTHONPATH=. bash experiments/gpu_check.sh        (on the GPU machine, from the repo root)
# Writes its logs and tables under $OUT and prints a short summary last. A dry run on the CPU:
#   GPU_CHECK_PLATFORM=cpu BENCH_FLAGS=--small HOST_FLAGS=--iters=5 STEP_FLAGS="--models=tiny-gpt
#   --buckets=16 --iters=1 --floor_model=tiny-gpt --floor_reqs=4 --floor_context=32" OUT=/tmp/o \
#   bash experiments/gpu_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH=. JAX_PLATFORMS="${GPU_CHECK_PLATFORM:-cuda}"
PY="${PYTHON:-python3}"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "card: ${card:-unknown}" | tee "$OUT/summary.txt"

# 1. Attention kernel: tests on the GPU, then the kernel benchmark (attention.md).
bash experiments/gpu_check_attention.sh >"$OUT/attention_check.log" 2>&1
attn_rc=$?

# 2. Whole-model step, gpt2 bf16, 128 decodes x 512 context, against its bandwidth floor.
for impl in reference pallas; do
  timeout 240 "$PY" experiments/bench_step.py --models=gpt2 --dtype=bfloat16 \
    --attention_impl=$impl --buckets=16,128,512 --iters=20 --floor_case \
    --out "$OUT/step_$impl.md" ${STEP_FLAGS:-} >"$OUT/step_$impl.log" 2>&1
  echo "step_$impl rc=$?" >>"$OUT/summary.txt"
done

# 3. Host time per iteration on this machine's CPU (for the <10% of step time goal).
timeout 120 "$PY" experiments/bench_host.py --policy=orca ${HOST_FLAGS:-} >"$OUT/host.log" 2>&1

{
  echo "attention check rc=$attn_rc"
  tail -25 "$OUT/attention_check.log"
  for impl in reference pallas; do echo "--- step ($impl)"; cat "$OUT/step_$impl.md" 2>/dev/null; done
  echo "--- host"; tail -1 "$OUT/host.log"
} >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
