# syntax=docker/dockerfile:1
# The taming image-token server (python -m service) with the shipped checkpoints.
#
#   CPU (default, small):  docker build -t taming-server:cpu .
#   CUDA:                  docker build --build-arg TORCH_VARIANT=cu130 -t taming-server:gpu .
#   run:                   docker run --rm -p 8000:8000 taming-server:cpu
#                          docker run --rm --gpus all -p 8000:8000 -e TAMING_DEVICE=cuda taming-server:gpu
#
# TORCH_VARIANT names a PyTorch wheel index (https://download.pytorch.org/whl/<variant>):
# `cpu` gives CPU-only wheels (no CUDA libraries, a fraction of the size); `cuXYZ` wheels carry
# their CUDA runtime as pip packages, so the same slim base serves both and the host only
# needs the NVIDIA driver and the NVIDIA Container Toolkit. torch 2.13.0 is built for CUDA
# 13.0 (`cu130`: the build PyPI carries too, whose metadata pins cuda-toolkit 13.0.3); CUDA 13
# needs an NVIDIA driver of the 580 series or newer. Every TAMING_* setting (see
# README) is read from the environment at start-up: docker run -e TAMING_MAX_BATCH_SIZE=128 ...

ARG PYTHON_VERSION=3.11

# ---- builder: a virtual environment with torch and the project --------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the variant's index: the project's own `torch>=2.3,<3` is then already
# met and pip does not pull the default (CUDA) build from PyPI.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY training ./training
COPY service ./service
RUN pip install ".[serve]" \
    && python -c "import torch, models, service; print('torch', torch.__version__)"

# ---- runtime: the venv, the checkpoints, a non-root user ---------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

ARG TORCH_VARIANT=cpu
# The generation step is built at start-up (TAMING_COMPILE). On CPU it is a frozen TorchScript
# trace: no compiler. On CUDA torch.compile emits Triton kernels, and Triton builds its CUDA
# driver module (C that includes Python.h and links the host's libcuda, so it cannot be built
# ahead here) with the system C compiler, gcc. Python's headers come with the base image.
RUN if [ "$TORCH_VARIANT" != cpu ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
LABEL org.opencontainers.image.title="taming-server" \
      org.opencontainers.image.description="Taming Transformers (VQ-VAE + sliding-window GPT) as a batched HTTP service" \
      org.opencontainers.image.licenses="MIT" \
      io.taming.torch-variant="${TORCH_VARIANT}"

RUN groupadd --system --gid 10001 taming \
    && useradd --system --uid 10001 --gid taming --create-home --home-dir /home/taming \
       --shell /usr/sbin/nologin taming

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# Read-only for the server's user: owned by root.
COPY checkpoints ./checkpoints

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    TAMING_DEVICE=auto \
    TAMING_CHECKPOINT_DIR=/app/checkpoints

USER 10001:10001
EXPOSE 8000

# Liveness only (the process answers); readiness (/readyz) is for load balancers.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=3)"]

# Exec form: python is PID 1 and receives SIGTERM itself, drains queued requests, exits 0.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
