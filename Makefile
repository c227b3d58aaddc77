# MiniInfer — the two commands: `make demo` and `make test`. Everything else is below.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.miniinfer-installed

.PHONY: help install demo test lab book execute sync lint cuda-compile clean student-edition

help:
	@echo "make demo     generate text with the bundled model (sets up .venv on first use)"
	@echo "make test     everything CI runs: lint, chapter sync, CUDA compile, unit tests, nbval, book + browser check"
	@echo "make lab      JupyterLab on work/, your own copies of chapters/ (LAB_ARGS=\"--no-browser --ip=0.0.0.0\" on a remote machine)"
	@echo "make book     build and serve the book on http://127.0.0.1:8000"
	@echo "make execute  re-execute the solution notebooks (store outputs), then regenerate chapters"
	@echo "make sync     regenerate chapters/ from solutions/"
	@echo "make student-edition OUT=DIR   the course without its answer key, for courses that grade"

# Create .venv and install torch (a CPU build unless there is an NVIDIA GPU) and miniinfer[dev].
$(STAMP): pyproject.toml scripts/bootstrap.sh
	VENV=$(VENV) bash scripts/bootstrap.sh $(PYTHON)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m miniinfer.demo

test: $(STAMP)
	VENV=$(VENV) bash scripts/test.sh

# JupyterLab on work/ (git-ignored): your copies of the chapters, made on first use and never overwritten,
# so saving never rewrites a tracked file and `make sync`/`make execute` never touch your answers.
# Remote machine: make lab LAB_ARGS="--no-browser --ip=0.0.0.0" (then open the printed URL with its token).
LAB_ARGS ?=
lab: $(STAMP)
	$(PY) -m miniinfer.course.workspace
	$(VENV)/bin/jupyter lab --notebook-dir=work $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

book: $(STAMP)
	$(PY) scripts/book.py serve

execute: $(STAMP)
	$(PY) -m miniinfer.course.notebooks execute $(CHAPTERS)

sync: $(STAMP)
	$(PY) -m miniinfer.course.notebooks sync

# The course without solutions/ and answer-key pages, with GRADING.md for instructors.
student-edition: $(STAMP)
	@test -n "$(OUT)" || { echo "usage: make student-edition OUT=../miniinfer-student"; exit 2; }
	$(PY) -m miniinfer.course.edition $(OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

cuda-compile: $(STAMP)
	$(PY) scripts/compile_cuda.py

clean:
	rm -rf site build docs/chapters docs/performance.md .pytest_cache .ruff_cache
