# Developer entry points. Recipes are the same commands .ci/run and the README use.
PYTHON ?= python

.PHONY: install test test-slow test-all lint protos protos-check demo lastfm independent-check synthetic-scale

# torch first, pinned (the same pin as the train extra), so nothing else picks the build.
install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev,peer]"

# The fast tier: unit tests and the in-process server over a real Redis (a few minutes).
test:
	$(PYTHON) -m pytest -q -m "not slow" tests

# The slow tier: subprocess servers, load and fault runs, compression, DDP.
test-slow:
	$(PYTHON) -m pytest -q -m slow tests

test-all: test test-slow

lint:
	ruff check . && ruff format --check .

protos:
	$(PYTHON) scripts/gen_protos.py

protos-check:
	$(PYTHON) scripts/gen_protos.py --check

# Synthetic data (the default dataset): no download needed.
demo:
	socialrec train --out runs/synthetic

lastfm:
	socialrec train --dataset lastfm --data-dir ../shared/datasets/hetrec2011-lastfm-2k --out runs/lastfm

# Re-implements EASE/ItemKNN from the spec and compares with runs/lastfm/report.json (run `make lastfm` first).
independent-check:
	$(PYTHON) benchmarks/independent_eval.py --run runs/lastfm

synthetic-scale:
	$(PYTHON) benchmarks/synthetic_scale.py
