#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (its python3 has torch, numpy, pillow, pyarrow, prometheus-client,
# but not these), at the versions of this checkout's .venv, for Python 3.12 on x86-64, into .whl-gpu/
# (git-ignored; the `device` tool carries it). Run here, before bench/gpu_session.sh runs there.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv
  boto3 botocore s3transfer jmespath transformers tokenizers)
pins=()
for name in "${packages[@]}"; do
  pins+=("$name==$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
rm -rf .whl-gpu && mkdir -p .whl-gpu  # one version of each: two stop the install there
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl-gpu "${pins[@]}"
ls .whl-gpu
