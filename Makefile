# moe_train: `make train` and `make test` are the contract (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines get the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0

.PHONY: setup train test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch; \
	else \
		$(PY) -m pip install -q $(TORCH_CPU); \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The tiny MoE on the embedded corpus; extra Hydra overrides via ARGS, e.g. make train ARGS="moe.top_k=1".
train: setup
	$(VENV)/bin/moe-train $(ARGS)

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/moe_layer.py

clean:
	rm -rf $(VENV) .pytest_cache
