# The README's two commands: `make demo` and `make test`. Each sets up what it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: an unpinned install would pull gigabytes of CUDA wheels.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo test lint typecheck unit integration clean bench bench-quick bench-gpu bench-http soak
.PHONY: bench-families bench-decode
.PHONY: image image-test k8s-validate

setup: $(STAMP) system-deps

# Debian packages the tests drive (docs/testing.md): Chromium for the dashboard's browser test and Prometheus
# for its fleet view. apt runs only when a binary is missing (as root, as on CI machines).
system-deps:
	@missing=""; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	test -x /usr/bin/prometheus || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing with apt-get"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/captionfleet demo

test: $(STAMP) system-deps lint typecheck
	$(BIN)/python -m pytest -q tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP) system-deps
	$(BIN)/python -m pytest -q tests/integration tests/e2e

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # the layers of docs/architecture.md

typecheck: $(STAMP)
	$(BIN)/mypy

# Benchmarks are commands, not tests (docs/benchmarks.md): side by side with the model card's usage.
bench: $(STAMP)
	$(BIN)/python -m bench.compare --out docs

bench-quick: $(STAMP)
	$(BIN)/python -m bench.compare --quick --out docs

# The served families side by side (ViT-GPT2, BLIP, GIT, Florence-2, SmolVLM): full-size architectures with
# random weights, fp32 vs bf16 where the CPU has it, one thread per row (docs/benchmarks.md, "Families").
bench-families: $(STAMP)
	$(BIN)/python -m bench.families --out docs

# The same side by side on a CUDA GPU (needs a CUDA build of torch in the venv). On the lent GPU
# machine, whose image has its own torch, run bench/gpu_session.sh instead (docs/benchmarks.md).
bench-gpu: $(STAMP)
	$(BIN)/python -m bench.gpu --out docs

# One CPU core's JPEG decode-and-resize rate (draft mode on and off, the worker's path), and the cores a GPU
# worker needs when decoding stays on the CPU (docs/benchmarks.md, "Decoding on the CPU").
bench-decode: $(STAMP)
	$(BIN)/python -m bench.decode_rate --out docs/benchmarks-decode.json

# The caption API's latency next to the same worker's bulk images/s (docs/benchmarks.md, issue 18).
bench-http: $(STAMP)
	$(BIN)/python -m bench.http_latency --out docs/benchmarks-http.json

soak: $(STAMP)
	$(BIN)/python -m bench.soak --out docs

# Containers and Kubernetes (README "Containers and Kubernetes").
# The image with your own Docker: GPU (CUDA torch from PyPI) by default, TORCH_VARIANT=cpu for a CPU
# image from the torch wheel in .whl/.
TORCH_VARIANT ?= cuda
IMAGE ?= captionfleet:$(TORCH_VARIANT)
image:
	DOCKER_BUILDKIT=1 docker build --build-arg TORCH_VARIANT=$(TORCH_VARIANT) -t $(IMAGE) .

# Builds the CPU image on a private Docker engine from a debootstrapped base and runs it (demo,
# worker /readyz); as root. Bounded: the whole run is cut off after 40 minutes.
image-test: $(STAMP)
	bash ops/install-image-tools.sh
	timeout --kill-after=120 2400 $(BIN)/python ops/image_test.py

# kustomize builds of every overlay, validated offline (no cluster needed).
k8s-validate: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration/test_k8s_manifests.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache demo-out
