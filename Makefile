# Common chores. `make up` runs the service with embedded defaults; `make test` runs the tests.
VENV := .venv/bin
PYTEST_ARGS ?=

.PHONY: up test lint fmt bench clean install gpu-bundle gpu-rehearsal

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

# The wheels the GPU run carries (bench/gpu_bundle.txt) -> .gpu-bundle/ (fails over 60 MiB).
gpu-bundle:
	$(or $(wildcard $(VENV)/python),python3) -m bench.gpu_bundle

# bench/gpu_check.sh on this CPU against a stand-in for the GPU image (tiny model).
gpu-rehearsal:
	bash scripts/gpu_rehearsal.sh

clean:
	rm -rf .lmqueue .pytest_cache .mypy_cache .ruff_cache
