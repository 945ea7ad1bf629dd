# Two entry points, each doing all set-up on a fresh machine (Python 3.11+ and nothing else):
#   make demo   the main job on the embedded PostgreSQL (pgserver) and Milvus Lite
#   make test   lint, types, and the test suite against every PostgreSQL it can reach
VENV ?= .venv
BIN := $(VENV)/bin
SYSTEM_PG ?= postgresql://postgres@127.0.0.1:5432/test

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/unified-memory demo

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	@if $(BIN)/python -c "import psycopg,sys; psycopg.connect('$(SYSTEM_PG)', connect_timeout=3).close()" 2>/dev/null; then \
		echo "== tests against the system PostgreSQL ($(SYSTEM_PG))"; \
		UNIFIED_MEMORY_TEST_DSN='$(SYSTEM_PG)' $(BIN)/pytest -q -p no:cacheprovider; \
	else echo "== no PostgreSQL at $(SYSTEM_PG): skipping that leg"; fi
	@echo "== tests against the embedded PostgreSQL 16 + pgvector (pgserver)"
	env -u UNIFIED_MEMORY_TEST_DSN $(BIN)/pytest -q -p no:cacheprovider

.PHONY: install demo test
