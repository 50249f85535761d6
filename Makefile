# Two commands for a new user: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo

.PHONY: demo test lint demo-clean install docs bench-table

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,ray,docs]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

# The documentation site (mkdocs.yml, docs/): every warning is an error. Open site/index.html.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(BIN)/mkdocs build --strict --site-dir site

demo: $(STAMP)
	$(BIN)/python scripts/demo.py --out $(DEMO_DIR)

demo-clean:
	rm -rf $(DEMO_DIR)

# The committed comparison (docs/bench.md): the imbalanced synth regime, every method at its
# declared defaults and tuned on val (6 Optuna trials each), 5 seeds, one bench folder.
# Resumable: run it again to continue where it stopped. Its runs/ and tune/ are not committed.
TABLE_DATA ?= build/synth-imbalanced
BENCH_TABLE ?= benchmarks/bench-synth-imbalanced
bench-table: $(STAMP)
	test -f $(TABLE_DATA)/shards/index.json || ( \
	  $(BIN)/avprep synth $(TABLE_DATA)/clips --regime imbalanced && \
	  $(BIN)/avprep build-shards --dataset synth --root $(TABLE_DATA)/clips --frame-size 32 \
	    --shard-size 2000 -o $(TABLE_DATA)/shards )
	$(BIN)/avtrain bench --recipe synth-imbalanced --shards $(TABLE_DATA)/shards \
	  -o $(BENCH_TABLE) --methods all --seeds 5 --tune 6 --no-progress
