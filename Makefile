# The two commands of the README. Both bootstrap .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# pinned: this wheel is on the build machines' disk; an unpinned torch pulls a multi-GB CUDA build
TORCH  ?= torch==2.13.0
NPROC  ?= auto

.PHONY: run test lint bench clean

$(BIN)/dptrain: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)" numpy
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]" "$(TORCH)"
	touch $@

run: $(BIN)/dptrain
	$(BIN)/dptrain data fetch mnist
	$(BIN)/dptrain train --strategy ddp --nproc $(NPROC) --model convnet --epochs 2 --log-every 200

test: $(BIN)/dptrain
	$(BIN)/python -m pytest -q

lint: $(BIN)/dptrain
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
