PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080
export IDMESH_ADMIN_TOKEN ?= demo-admin-token

.PHONY: run test bench lint install

$(BIN)/idmesh: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/idmesh

install: $(BIN)/idmesh

# the demo workspace's audience "Searchers" syncs to a webhook sink on port 9200 (data/demo.json), started beside
# the server and stopped with it
run: install
	@mkdir -p .run
	@$(BIN)/idmesh sink --port 9200 --secret demo-webhook-secret & sink=$$!; \
	trap 'kill $$sink 2>/dev/null' EXIT INT TERM; \
	$(BIN)/idmesh serve --port $(PORT) --db .run/demo.duckdb --config data/demo.json

test: install
	bash .ci/install-browser.sh
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/identify.py

lint: install
	$(BIN)/ruff check api audiences engine strategies tests bench

.PHONY: bench-ingest
bench-ingest: install
	$(BIN)/python bench/ingest.py

.PHONY: bench-calculated
bench-calculated: install
	$(BIN)/python bench/calculated.py

.PHONY: bench-audiences
bench-audiences: install
	$(BIN)/python bench/audiences.py

.PHONY: bench-delivery
bench-delivery: install
	$(BIN)/python bench/delivery.py
