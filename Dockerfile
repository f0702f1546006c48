# minillm serve in a container: the OpenAI-compatible server (minillm/serve/api.py) on port 8000.
#
#   docker build -t minillm-serve .                                           # CPU (the default)
#   docker run -p 8000:8000 -v "$PWD/out/shakespeare-char:/models/default:ro" minillm-serve
#   curl -s localhost:8000/health
#
# Build arguments:
#   BASE_IMAGE    any Debian-like image with python3 (3.10+) and its venv module; the builder and the
#                 runtime stage both start from it, so the venv copied between them finds its python.
#   TORCH_INDEX   where PyTorch comes from. The CPU index keeps the image small (a plain `torch` from
#                 PyPI is the CUDA build, several GB). CUDA variant:
#                   docker build -t minillm-serve:cu126 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
#                   docker run --gpus all -p 8000:8000 -v ... minillm-serve:cu126 --dtype=bfloat16
#                 The CUDA wheels bring their own CUDA libraries (the nvidia-* wheels), so the default
#                 base works; the host needs only the NVIDIA driver and the NVIDIA Container Toolkit.
#   TORCH_VERSION the PyTorch release to install (the one CI tests, .ci/run).
#   TORCH_WHEEL   optional: a torch wheel inside the build context, installed instead of the index,
#                 for machines that cannot reach download.pytorch.org (must match BASE_IMAGE's python).
#   CHECKPOINT    optional: a checkpoint folder (or a training run's folder) inside the build context,
#                 baked into the image at /models/default, e.g. --build-arg CHECKPOINT=models/shakespeare.
#                 .dockerignore keeps out*/ out of the context, so copy the one checkpoint elsewhere
#                 first. Without it, mount one at /models/default at run time.
#
# Behind a port reachable by others, set an API key: docker run -e MINILLM_API_KEY=... (/health stays open).
# Arguments after the image name are passed to `minillm serve`: docker run ... minillm-serve --model-name=shakespeare

ARG BASE_IMAGE=python:3.12-slim

# --- builder: a virtual environment with torch and minillm[serve] ----------------------------------
FROM ${BASE_IMAGE} AS builder
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_WHEEL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src
# torch first, in its own layer: the largest and the one that changes least. With TORCH_WHEEL empty
# this copies pyproject.toml, unused (a bare empty ${TORCH_WHEEL} would copy the whole context).
COPY ${TORCH_WHEEL:-pyproject.toml} /tmp/torch/
RUN if [ -n "${TORCH_WHEEL}" ]; then \
        pip install "/tmp/torch/$(basename "${TORCH_WHEEL}")"; \
    else \
        pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"; \
    fi \
    && rm -rf /tmp/torch
COPY pyproject.toml README.md ./
COPY minillm minillm
COPY kernels kernels
# a regular (not editable) install: the runtime stage gets the venv, not the source tree.
# DL3013 (pin versions): "." is this checkout, and its dependencies' bounds live in pyproject.toml
# hadolint ignore=DL3013
RUN pip install ".[serve]" \
    && python -c "import minillm.cli, fastapi, uvicorn"

# --- checkpoint: /models/default, empty unless CHECKPOINT names a folder in the build context -------
FROM ${BASE_IMAGE} AS checkpoint
ARG CHECKPOINT=
# a folder's contents land in /models/default; with CHECKPOINT empty the placeholder pyproject.toml
# does, and is removed (a bare empty ${CHECKPOINT} would copy the whole build context)
COPY ${CHECKPOINT:-pyproject.toml} /models/default/
RUN if [ -z "${CHECKPOINT}" ]; then rm /models/default/pyproject.toml; fi

# --- runtime: the venv, a non-root user, the server --------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
RUN groupadd --gid 10001 minillm \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/minillm --shell /usr/sbin/nologin minillm
COPY --from=builder /opt/venv /opt/venv
COPY --from=checkpoint --chown=10001:10001 /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# numeric, so that runtimes checking runAsNonRoot (Kubernetes) can tell it is not root
USER 10001:10001
WORKDIR /home/minillm
EXPOSE 8000
# 200 from /health means the model is loaded and the decode loop runs; python's urllib, so no curl.
# (start-period: importing torch and loading the model; a bigger model on a slow disk may need more)
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# the checkpoint is always /models/default (mounted or baked in): arguments after the image name are
# more options, e.g. docker run ... minillm-serve --model-name=shakespeare --max_batch_size=32
ENTRYPOINT ["minillm", "serve", "/models/default", "--host=0.0.0.0", "--port=8000"]
