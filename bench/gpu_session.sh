#!/usr/bin/env bash
# The GPU checks as one prepared run on the `device` machine (docs/benchmarks.md, "GPU"):
#   here:  bash bench/gpu_wheels.sh
#   there: run(command="bash bench/gpu_session.sh", carry=[".whl-gpu"], timeout_s=540)
# Everything it prints and writes lands under $OUT (the tool brings that folder back).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-gpu/*.whl || exit
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
# Correctness first (auto picks CUDA half precision; batched equals one-by-one), then the benchmark.
timeout 120 python3 bench/device_check.py 2>&1 | tee "$OUT/device_check.log"
timeout "${BENCH_SECONDS:-360}" python3 -m bench.gpu --quick --out "$OUT" --work /tmp/bench-gpu 2>&1 | tee "$OUT/bench-gpu.log"
