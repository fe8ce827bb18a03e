#!/usr/bin/env bash
# The GPU checks as one prepared run on the `device` machine (docs/benchmarks.md, "GPU"):
#   here:  bash bench/gpu_wheels.sh
#   there: run(command="bash bench/gpu_session.sh", carry=[".whl-gpu"], timeout_s=540)
# Everything it prints and writes lands under $OUT (the tool brings that folder back).
# PARTS picks what runs (default all three; one device call is at most 10 minutes, so split it if needed:
# PARTS="check vitgpt2", then PARTS=families).
set -uo pipefail
PARTS=" ${PARTS:-check vitgpt2 families} "
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-gpu/*.whl || exit
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
# Correctness first (auto picks CUDA half precision; batched equals one-by-one), then the benchmark.
status=0
if [[ $PARTS == *" check "* ]]; then
  timeout 240 python3 bench/device_check.py 2>&1 | tee "$OUT/device_check.log" || status=$?
fi
if [[ $PARTS == *" vitgpt2 "* ]]; then
  timeout "${BENCH_SECONDS:-360}" python3 -m bench.gpu --quick --out "$OUT" --work /tmp/bench-gpu 2>&1 \
    | tee "$OUT/bench-gpu.log" || status=$?
fi
# The families side by side (full-size, random weights; fp32, fp16, bf16): one round of 64 images per row.
if [[ $PARTS == *" families "* ]]; then
  timeout "${FAMILIES_SECONDS:-420}" python3 -m bench.families --device cuda --images 64 --rounds 1 --threads 0 \
    --out "$OUT" --work /tmp/bench-families 2>&1 | tee "$OUT/bench-families.log" || status=$?
fi
exit "$status"
