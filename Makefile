# tract-bench: `make train` (install + a short real CIFAR-10 run), `make test` (install + the test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: help install train test
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create .venv and install tract-bench (editable) with its test and launcher extras

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,launchers]'
	touch $@

train: install  ## a short real training run (experiment=smoke; CIFAR-10 from $$TRACT_DATA or downloaded); ARGS=... adds overrides
	$(BIN)/tract-train experiment=smoke $(ARGS)

test: install  ## the test suite (CPU); real-data tests run when $$TRACT_DATA holds CIFAR-10
	$(BIN)/python -m pytest -q $(ARGS)

EXP      ?= fig3_sgd
SCALE    ?= smoke
LAUNCHER ?= basic
.PHONY: reproduce
reproduce: install  ## the paper's experiments: EXP=fig3_sgd|fig3_adam|cifar100|vit_cifar|lambda_sweep|all SCALE=smoke|short|paper LAUNCHER=basic|joblib|slurm
	$(BIN)/python scripts/reproduce.py --exp $(EXP) --scale $(SCALE) --launcher $(LAUNCHER) $(ARGS)

.PHONY: bench bench-tract
bench: install  ## training throughput: tract-train's loop vs the official script's loop, with/without TrAct (results/bench.md); ARGS=... adds flags
	$(BIN)/python scripts/bench_train.py $(ARGS)

bench-tract: install  ## TrAct's overhead per training step, interleaved with the baseline (results/bench_tract.csv)
	$(BIN)/python scripts/bench_tract.py $(ARGS)
