# syntax=docker/dockerfile:1.7
# Lever GPU image: every `lever stage ...` pod of the Argo pipeline runs this.
#
# Pinned: the CUDA base tag, the uv binary (which supplies a pinned CPython 3.11 on Ubuntu 22.04), and
# every Python package, transitive ones included, from requirements-cuda.lock (torch's CUDA 13.0 build
# from PyPI with the NVIDIA runtime wheels it loads), installed with --no-deps and checked.
# No torchvision: the Qwen2.5-VL processor is built without its video processor (lever.models.pretrained).
# No credentials: S3 keys arrive at run time from a Kubernetes Secret (env), never at build time.
# Build:  docker build -t ghcr.io/lever-ml/lever:0.1.0 .

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu22.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.5

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS runtime
ARG PYTHON_VERSION=3.11.14
ARG TORCH_VERSION=2.13.0
ARG LEVER_UID=10001

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    LEVER_CACHE_DIR=/cache/lever \
    MPLCONFIGDIR=/tmp/matplotlib

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

COPY --from=uv /uv /usr/local/bin/uv

# Interpreter and dependencies first (a code change does not reinstall torch).
COPY requirements-cuda.lock /tmp/build/requirements-cuda.lock
RUN uv python install ${PYTHON_VERSION} \
 && uv venv --python ${PYTHON_VERSION} ${VIRTUAL_ENV} \
 && uv pip install --python ${VIRTUAL_ENV}/bin/python --no-deps -r /tmp/build/requirements-cuda.lock \
 && grep -qx "torch==${TORCH_VERSION}" /tmp/build/requirements-cuda.lock \
 && uv pip check --python ${VIRTUAL_ENV}/bin/python \
 && rm -rf /tmp/build

COPY pyproject.toml /src/pyproject.toml
COPY lever /src/lever
RUN uv pip install --python ${VIRTUAL_ENV}/bin/python --no-deps /src \
 && rm -rf /src \
 && lever --help > /dev/null

# Numeric non-root user (Kubernetes runAsNonRoot can verify a numeric UID); the pods mount
# /tmp and /cache as emptyDirs over a read-only root filesystem.
RUN groupadd --gid ${LEVER_UID} lever \
 && useradd --uid ${LEVER_UID} --gid ${LEVER_UID} --no-create-home --home-dir /tmp --shell /usr/sbin/nologin lever \
 && mkdir -p /cache && chown ${LEVER_UID}:${LEVER_UID} /cache
USER 10001:10001
WORKDIR /tmp

ENTRYPOINT ["lever"]
CMD ["--help"]
