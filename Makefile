# Two commands for a new user: `make demo` and `make test`. Both do all set-up first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tinyfleet-installed
SYSSTAMP := var/.system-deps

.PHONY: setup demo test lint bench lock clean
.DEFAULT_GOAL := demo

setup: $(SYSSTAMP) $(STAMP)

$(SYSSTAMP): deploy/install-system-deps.sh
	PYTHON=$(PYTHON) bash deploy/install-system-deps.sh
	@mkdir -p var && touch $@

# Exactly the versions CI tested: requirements.lock (hashes checked), made by `make lock` from
# pyproject.toml's ranges. torch first and pinned (the CPU build where pip finds one), so that
# nothing pulls an unpinned (multi-GB CUDA) build; the lock leaves torch out for that reason.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	@touch $@

demo: setup
	$(BIN)/tinyfleet demo

# pytest exits 5 when it collects no test: that is a failure of the suite, say so.
test: setup
	@$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy firmware device_agent

bench: setup
	$(BIN)/python -m bench.run_all

# Re-resolve pyproject.toml's ranges into requirements.lock, keeping the locked versions that
# still fit (LOCK_FLAGS=--upgrade: the newest of everything). torch is resolved as its CPU
# build (TORCH_WHEELS: a folder or index that has it) and left out of the lock.
LOCK_FLAGS ?=
TORCH_WHEELS ?= $(if $(wildcard /opt/wheels/torch-*),/opt/wheels,https://download.pytorch.org/whl/cpu)
lock: setup
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes $(LOCK_FLAGS) \
	    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	    --find-links $(TORCH_WHEELS) --no-emit-package torch -o requirements.lock

clean:
	rm -rf var build .pytest_cache
