# Common chores. `make up` runs the service with embedded defaults; `make test` runs the tests.
VENV := .venv/bin
PYTEST_ARGS ?=

.PHONY: up test lint fmt bench clean install

install:
	@scripts/bootstrap.sh

up: install
	$(VENV)/lmqueue up $(ARGS)

test: install
	$(VENV)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/ruff check .
	$(VENV)/mypy

fmt: install
	$(VENV)/ruff check --fix .
	$(VENV)/ruff format .

bench: install
	$(VENV)/python -m bench.e2e

clean:
	rm -rf .lmqueue .pytest_cache .mypy_cache .ruff_cache
