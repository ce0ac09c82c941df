# treespec: `make serve` and `make test` work on a fresh machine (Python 3.10+, pip reaching PyPI).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_DIR := .cache/models/SmolLM2-135M-Instruct
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install model serve test test-fast test-e2e test-faults test-image bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

$(MODEL_DIR)/.complete: $(VENV)/.installed
	$(PY) -m server.models.fetch --dest $(MODEL_DIR)

model: $(MODEL_DIR)/.complete

serve: install model
	$(VENV)/bin/treespec serve --host $(HOST) --port $(PORT)

test: install model
	$(PY) -m pytest -q

test-e2e: install model
	$(PY) -m pytest -q -m e2e tests/e2e

# Sizes: TREESPEC_FAULTS_N (500), _CONCURRENCY (64), ... (tests/faults/load.py, FaultConfig)
test-faults: install model
	$(PY) -m pytest -q -s -m faults tests/faults

# Root; apt-installs podman, mmdebstrap, docker-compose, prometheus (deploy/test_image.sh; not in `make test`)
test-image: install model
	deploy/test_image.sh

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests/unit

bench: install model
	$(VENV)/bin/treespec bench --questions ../shared/data/mt_bench.jsonl --baseline --out bench/results/mt_bench.json

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis
