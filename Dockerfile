# One image for worker, trainer and dashboard (the command picks the part).
# GPU by default: PyPI's torch wheels carry the CUDA runtime. For a CPU image:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
# (Building and running it in CI, with a locally made base image, is issue "Containers and Kubernetes".)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first, in their own layers, so a code change does not reinstall them.
RUN pip install ${TORCH_INDEX:+--index-url $TORCH_INDEX} "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
RUN mkdir -p worker trainer dashboard && touch worker/__init__.py trainer/__init__.py dashboard/__init__.py \
    && pip install . && pip uninstall -y captionfleet
COPY worker ./worker
COPY trainer ./trainer
COPY dashboard ./dashboard
RUN pip install --no-deps .

FROM ${PYTHON_IMAGE}
RUN useradd --create-home --uid 10001 captionfleet
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/captionfleet/.cache/huggingface \
    WORKER_MODEL__CACHE_DIR=/home/captionfleet/.cache/captionfleet/models
USER 10001
WORKDIR /home/captionfleet
# No HEALTHCHECK yet: the streaming worker's /healthz endpoint arrives with its issue.
ENTRYPOINT ["captionfleet"]
CMD ["demo"]
