# moe_train: `make train` and `make test` are the contract (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines get the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0

.PHONY: setup train finetune test test-all bench gpu-check clean

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

# Fine-tuning demo (docs/FINETUNING.md): pre-train the tiny MoE on the embedded corpus (once; kept in
# runs/finetune/pretrain), fine-tune it on the generated instruction set (loss on responses only, router frozen,
# expert dropout), then evaluate the result on the held-out instructions. Extra overrides of the fine-tuning run: ARGS.
FT_DIR := runs/finetune
$(FT_DIR)/pretrain/weights.safetensors: | setup
	$(VENV)/bin/moe-train train.max_steps=300 hydra.run.dir=$(FT_DIR)/pretrain

finetune: setup $(FT_DIR)/pretrain/weights.safetensors
	$(VENV)/bin/moe-train data=chat init.from=$(FT_DIR)/pretrain/weights.safetensors "finetune.freeze=[router]" \
		moe.expert_dropout=0.1 optim.lr=1e-3 optim.warmup_steps=10 train.batch_size=8 train.max_steps=200 \
		train.eval_every=50 hydra.run.dir=$(FT_DIR)/sft $(ARGS)
	$(VENV)/bin/moe-train-eval $(FT_DIR)/sft/weights.safetensors

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/moe_layer.py

# On a machine with one CUDA GPU, offline: train/eval/checkpoint/kill-resume in bf16, a step under sync-debug "error",
# train.compile, bench/gpu_e2e.py --quick; one table (moe_train/gpu_check.py). Needs only CUDA torch and PyYAML:
# the project's .venv when there is one, else python3 (GPU_PYTHON=... for another interpreter).
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) -m moe_train.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
