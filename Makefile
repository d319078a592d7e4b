# mlx-local: `make run` sets everything up and serves the default model; `make test` tests it all.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint venv system-deps agents

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/setup-repo
	$(BIN)/mlx-local serve --fallback-demo

test: $(STAMP) system-deps
	$(BIN)/python -m pytest

# Tools the tests use to validate what Linux cannot run (plists) and the systemd unit;
# installed with a guarded apt-get where possible.
system-deps:
	@bash .ci/install-test-tools

# The coding agents tests/agents/ runs (npm, into .cache/agents/; again only when the lock changes).
agents: $(STAMP)
	$(BIN)/python -m tests.agents.install

lint: $(STAMP)
	$(BIN)/ruff check tools tests
	$(BIN)/ruff format --check tools tests
	$(BIN)/mlx-local patches lint
