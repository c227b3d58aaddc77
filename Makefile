# MiniInfer — the two commands: `make demo` and `make test`. Everything else is below.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.miniinfer-installed

.PHONY: help install demo test lab book execute sync lint cuda-compile clean

help:
	@echo "make demo     generate text with the bundled model (sets up .venv on first use)"
	@echo "make test     everything CI runs: lint, chapter sync, CUDA compile, unit tests, nbval, book + browser check"
	@echo "make lab      JupyterLab on chapters/"
	@echo "make book     build and serve the book on http://127.0.0.1:8000"
	@echo "make execute  re-execute the solution notebooks (store outputs), then regenerate chapters"
	@echo "make sync     regenerate chapters/ from solutions/"

# Create .venv and install torch (a CPU build unless there is an NVIDIA GPU) and miniinfer[dev].
$(STAMP): pyproject.toml scripts/bootstrap.sh
	VENV=$(VENV) bash scripts/bootstrap.sh $(PYTHON)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m miniinfer.demo

test: $(STAMP)
	VENV=$(VENV) bash scripts/test.sh

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=chapters

book: $(STAMP)
	$(PY) scripts/book.py serve

execute: $(STAMP)
	$(PY) -m miniinfer.course.notebooks execute $(CHAPTERS)

sync: $(STAMP)
	$(PY) -m miniinfer.course.notebooks sync

lint: $(STAMP)
	$(VENV)/bin/ruff check .

cuda-compile: $(STAMP)
	$(PY) scripts/compile_cuda.py

clean:
	rm -rf site build docs/chapters docs/performance.md .pytest_cache .ruff_cache
