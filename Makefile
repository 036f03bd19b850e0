# Two entry points: `make demo` (the main job) and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first and pinned: pip takes the local CPU wheel, never gigabytes of CUDA packages.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install torch==2.13.0 -e ".[dev,peft,trl]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) lightning_examples/forgetting_demo.py fit --config configs/forgetting_demo.yaml

test: $(STAMP)
	WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/bench_capture.py
	$(PY) benchmarks/bench_qkov.py
	$(PY) benchmarks/bench_trainer.py

clean:
	rm -rf $(VENV) runs lightning_logs wandb .pytest_cache
