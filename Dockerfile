# One image for every part; the command picks it:
#   docker run IMAGE worker            the Kafka streaming worker (/metrics /healthz /readyz on 9400)
#   docker run IMAGE caption s3://...  the bulk S3 job (a Kubernetes Indexed Job runs one pod per shard)
#   docker run IMAGE train ...         the trainer
#   docker run IMAGE dashboard         the Streamlit dashboard
#   docker run IMAGE                   `captionfleet demo`: captions a generated archive, offline
#
# GPU by default: PyPI's torch wheels for Linux carry the CUDA runtime, so only the host's driver
# (nvidia-container-toolkit) is needed. CPU build, from a torch wheel in the build context (nothing
# downloads CUDA wheels): put torch-<TORCH_VERSION>+cpu-*.whl into .whl/ and
#   docker build --build-arg TORCH_VARIANT=cpu .
# ops/image_test.py does exactly that, with a locally made base image (see README).
#
# Builds behind a TLS-inspecting proxy: pass its CA as a build secret, never as a file in the image:
#   docker build --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt .

# Debian's own python3 (3.11 in bookworm) rather than python:3.11-slim: the base can then be made
# from Debian's mirror with debootstrap where no registry is reachable (ops/image_test.py).
ARG BASE_IMAGE=debian:bookworm-slim
# cuda (PyPI torch, default) or cpu (the wheel from .whl/ in the build context).
ARG TORCH_VARIANT=cuda

# ---- build: a virtualenv in /opt/venv, copied whole into the runtime stage -----------------------
FROM ${BASE_IMAGE} AS build-base
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# setuptools here so the project installs below without build isolation (no download per code change).
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir pip==26.3 setuptools==84.2.1

# torch first and alone: the largest layer changes only with TORCH_VERSION.
FROM build-base AS torch-cuda
ARG TORCH_VERSION=2.13.0
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}"

FROM build-base AS torch-cpu
ARG TORCH_VERSION=2.13.0
# Only this stage reads .whl/, so a GPU build works without it. The wheel is copied to a stage that
# is not shipped; the runtime image gets the installed package only.
COPY .whl/ /tmp/wheels/
# The wheel file's name pins the version (DL3013 cannot see that).
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && set -- /tmp/wheels/torch-"${TORCH_VERSION}"+cpu-*.whl \
    && if [ ! -f "$1" ]; then \
         echo "no torch-${TORCH_VERSION}+cpu wheel in .whl/ of the build context: copy it there (ops/image_test.py does)" >&2; \
         exit 1; \
       fi \
    && pip install --no-cache-dir "$1"

# The runtime dependencies out of pyproject.toml. Only this file reaches the next stage, so editing
# anything else in pyproject.toml (dev extras, tool settings) leaves the dependency layer cached.
FROM build-base AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
    > requirements.txt

# Dependencies before code, so editing code (or the README) does not reinstall them.
# hadolint ignore=DL3006
FROM torch-${TORCH_VARIANT} AS deps
WORKDIR /src
COPY --from=requirements /src/requirements.txt ./
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && pip install --no-cache-dir -r requirements.txt

FROM deps AS app
COPY pyproject.toml README.md ./
COPY captionfleet ./captionfleet
COPY worker ./worker
COPY trainer ./trainer
COPY dashboard ./dashboard
# --no-deps: everything is installed above; a missing dependency fails the import check instead.
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && pip check \
    && python -I -c "import captionfleet.cli, captionfleet.demo, captionfleet.worker.__main__, captionfleet.dashboard.uploads, captionfleet.dashboard.fleet"

# ---- runtime: python3 and the venv, no compilers, no pip caches, no build context ----------------
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group captionfleet
COPY --from=app /opt/venv /opt/venv
COPY ops/healthcheck.py /opt/captionfleet/healthcheck.py
# Caches under one folder, so Kubernetes can mount a single emptyDir there under a read-only root.
# One malloc arena: the model thread's large tensors then come from the main heap, which keeps them for the
# next batch (captionfleet/core/fastpath.py, reuse_freed_memory); other arenas mmap every block over 64 MiB.
ENV PATH=/opt/venv/bin:$PATH \
    MALLOC_ARENA_MAX=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/home/captionfleet/.cache/huggingface \
    WORKER_MODEL__CACHE_DIR=/home/captionfleet/.cache/captionfleet/models \
    TRAINER_CACHE_DIR=/home/captionfleet/.cache/captionfleet/models
USER 10001:10001
WORKDIR /home/captionfleet
# 9400: worker /metrics /healthz /readyz (WORKER_METRICS__PORT); 8501: dashboard.
EXPOSE 9400 8501
# Liveness of whichever part runs: the worker's /healthz, the dashboard's health page, else exit 0
# (a demo, a training run or a bulk job has no server; its exit code is its health).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/opt/venv/bin/python", "/opt/captionfleet/healthcheck.py"]
ENTRYPOINT ["captionfleet"]
CMD ["demo"]
