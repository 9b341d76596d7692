# stalwart: every README command goes through here.
# On a CPU-only machine the venv gets the local CPU build of torch (torch==2.13.0) *before*
# the project is installed, so the `torch>=2.6` requirement never pulls a multi-GB CUDA build.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
CONFIG  ?= configs/tiny-cpu.toml
DATA    ?= data/stdlib-bpe4096
TOKENIZER ?= bpe:4096
RUN     ?= runs/tiny-cpu
PYTEST_ARGS ?=

.PHONY: install dev train prepare test test-fast lint format bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	@# train.cpu_kernels: compile stalwart's CPU kernels once now (~20 s) rather than in the
	@# first run; without a C++ compiler runs use torch's ops (and say so)
	$(BIN)/python -m stalwart.model.cpu_kernels || echo "note: stalwart's CPU kernels were not built; runs will use torch's ops"
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed
dev: $(BIN)/.installed-dev

$(DATA)/meta.json: | $(BIN)/.installed
	$(BIN)/stalwart prepare --tokenizer $(TOKENIZER) --out $(DATA)

prepare: $(DATA)/meta.json

train: $(BIN)/.installed $(DATA)/meta.json
	$(BIN)/stalwart train --config $(CONFIG) --data.dir $(DATA) --run.dir $(RUN)

test: $(BIN)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(BIN)/.installed-dev
	$(BIN)/python -m pytest -m "not slow and not dist" $(PYTEST_ARGS)

lint: $(BIN)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(BIN)/.installed-dev
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(BIN)/.installed $(DATA)/meta.json
	$(BIN)/stalwart bench --config $(CONFIG) --data.dir $(DATA)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
