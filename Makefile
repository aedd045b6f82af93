# Two commands for a new user: `make demo` and `make test`. Both do all set-up first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tinyfleet-installed
SYSSTAMP := var/.system-deps

.PHONY: setup demo test lint bench clean
.DEFAULT_GOAL := demo

setup: $(SYSSTAMP) $(STAMP)

$(SYSSTAMP): deploy/install-system-deps.sh
	PYTHON=$(PYTHON) bash deploy/install-system-deps.sh
	@mkdir -p var && touch $@

# torch first and pinned, so that nothing pulls an unpinned (multi-GB CUDA) build.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
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

clean:
	rm -rf var build .pytest_cache
