# The README's commands. `make run` and `make test` are all a fresh machine needs.
PY312 ?= $(shell PYENV_VERSION=3.12.1 pyenv which python 2>/dev/null || command -v python3.12 || echo python3)
VENV := .venv
BIN := $(VENV)/bin
# Exact versions of everything the venv installs (see the file's header).
CONSTRAINTS := .ci/constraints.txt
PYTEST_WORKERS ?= 2

.PHONY: venv constraints run web test lint fmt check bench bench-litellm fleet redis-cost proxy-cost soak clean worker-wheelhouses worker-typecheck orchestrator-venvs

# Running needs the proxy's packages only; tests and lint need the rest (and, in `venv`,
# Debian's chromium and faketime).
$(VENV)/.run-installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY312) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[proxy]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY312) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $@ $(VENV)/.run-installed

venv: $(VENV)/.dev-installed
	command -v chromium >/dev/null && command -v faketime >/dev/null || (apt-get update && apt-get install -y chromium faketime)

## Pin $(CONSTRAINTS) to what pyproject.toml's ranges resolve to today (a fresh venv, then
## `pip freeze`); review the diff, then run `make test` on it.
constraints:
	rm -rf $(VENV)/constraints && $(PY312) -m venv $(VENV)/constraints
	$(VENV)/constraints/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/constraints/bin/python -m pip install --quiet -e '.[dev]'
	{ sed -n '/^#/p' $(CONSTRAINTS); $(VENV)/constraints/bin/python -m pip freeze --exclude-editable; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS) && rm -rf $(VENV)/constraints

## Start the proxy on the embedded SQLite store (forward :8080, admin :8081).
run: $(VENV)/.run-installed
	$(BIN)/keybrake ca
	$(BIN)/keybrake run

## The same with mitmweb's live flow UI.
web: $(VENV)/.run-installed
	$(BIN)/keybrake ca
	$(BIN)/keybrake run --web

# Wheels of everything `pip install 'keybrake[proxy]'` needs, so the install tests build and
# install the package in fresh venvs without reaching an index.
$(VENV)/wheelhouse/.done: pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip wheel --quiet -c $(CONSTRAINTS) -w $(VENV)/wheelhouse '.[proxy]' setuptools wheel
	touch $@

# The worker side (`pip install keybrake`) runs on CPython 3.9 to 3.13; for each (pyenv), a
# wheelhouse of what tests/e2e/test_worker_matrix.py installs beside the keybrake wheel
# (dramatiq, stripe, apache-beam where PyPI has it for that Python). Built in parallel.
WORKER_PYTHONS ?= 3.9 3.10 3.11 3.12 3.13
MATRIX := $(VENV)/matrix
$(MATRIX)/%/.done: pyproject.toml tests/matrix/wheelhouse.sh
	tests/matrix/wheelhouse.sh $* $(MATRIX)/$*

worker-wheelhouses:
	$(MAKE) -j 4 $(foreach v,$(WORKER_PYTHONS),$(MATRIX)/$(v)/.done)

# Airflow and Prefect bring dependency sets of their own (SQLAlchemy, FastAPI, their own pins),
# so each gets its own venv on the proxy's Python with `keybrake[<name>]` from this tree
# (editable: the tests run the tree's integrations) and the stripe SDK, for
# tests/e2e/test_orchestrators.py (network: here only, never in a test). Built in parallel.
ORCHESTRATORS := $(VENV)/orchestrators
$(ORCHESTRATORS)/%/.done: pyproject.toml
	rm -rf $(ORCHESTRATORS)/$*
	$(PY312) -m venv $(ORCHESTRATORS)/$*
	$(ORCHESTRATORS)/$*/bin/python -m pip install --quiet --disable-pip-version-check \
	  -e '.[$*]' 'stripe>=10'
	touch $@

orchestrator-venvs:
	$(MAKE) -j 2 $(ORCHESTRATORS)/airflow/.done $(ORCHESTRATORS)/prefect/.done

# mypy on the worker modules as Python 3.9 sees them (mypy 2 cannot target 3.9: mypy 1.x,
# run on 3.9 itself, with the worker's real dependencies).
$(MATRIX)/typecheck/.done: pyproject.toml
	rm -rf $(MATRIX)/typecheck
	$$(PYENV_VERSION=3.9 pyenv which python) -m venv $(MATRIX)/typecheck
	$(MATRIX)/typecheck/bin/python -m pip install --quiet --disable-pip-version-check \
	  --use-pep517 --prefer-binary 'mypy>=1.11,<2' types-requests 'httpx>=0.27' \
	  'dramatiq[redis]>=1.17' 'stripe>=10' twilio 'apache-beam>=2.60'
	touch $@

worker-typecheck: $(MATRIX)/typecheck/.done
	$(MATRIX)/typecheck/bin/mypy --config-file tests/matrix/mypy-py39.ini

## The whole test suite (unit, addon, store contract, end to end, the worker side on 3.9-3.13,
## Airflow and Prefect in their own venvs).
test: venv $(VENV)/wheelhouse/.done worker-wheelhouses orchestrator-venvs
	@# Bytecode for the package, written even under PYTHONDONTWRITEBYTECODE: each of the
	@# suite's ~340 proxy starts and CLI calls would compile it again (~0.25 s of CPU each).
	$(BIN)/python -m compileall -q addon >/dev/null
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile -q

lint: venv worker-typecheck
	$(BIN)/ruff check addon tests bench
	$(BIN)/ruff format --check addon tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

## What CI runs (`.ci/run` on a clean clone): lint, type checks, then the whole suite.
check: lint
	KEYBRAKE_WORKER_MATRIX=required $(MAKE) test

fmt: venv
	$(BIN)/ruff check --fix addon tests bench
	$(BIN)/ruff format addon tests bench

## Throughput and added latency against bare mitmdump (not part of `make test`).
bench: venv
	$(BIN)/python bench/run.py

## Replicas on one (private) Redis: Redis CPU, commands and bytes per vendor call, the fleet
## ceiling, and the exact-cap and audit check (not part of `make test`).
FLEET_ARGS ?=
fleet: venv
	$(BIN)/python bench/fleet.py $(FLEET_ARGS)

## Redis server instructions per vendor call (callgrind: repeatable on a noisy machine);
## REDIS_COST_ARGS="--baseline DIR" compares another checkout's addon/.
redis-cost: venv
	$(BIN)/python bench/redis_cost.py $(REDIS_COST_ARGS)

## The proxy process's instructions (callgrind) and system calls (perf) per vendor call, bare
## mitmdump and Keybrake; PROXY_COST_ARGS="--baseline DIR" compares another checkout's addon/.
proxy-cost: venv
	$(BIN)/python bench/proxy_cost.py $(PROXY_COST_ARGS)

## 64 AI agents against one $1 budget, Keybrake beside LiteLLM's proxy (its own venv, built
## once from PyPI; not part of `make test`).
LITELLM_VERSION ?= 1.108.7
$(VENV)/litellm/.done:
	$(PY312) -m venv $(VENV)/litellm
	$(VENV)/litellm/bin/python -m pip install --quiet 'litellm[proxy]==$(LITELLM_VERSION)'
	touch $@

bench-litellm: venv $(VENV)/litellm/.done
	$(BIN)/python bench/litellm_cap.py --litellm $(VENV)/litellm/bin/litellm

## Two replicas sharing Redis under random faults for N minutes (not part of `make test`).
SOAK_MINUTES ?= 10
SOAK_RATE ?= 20
SOAK_CAP ?= 5000
soak: venv
	$(BIN)/python bench/soak.py --minutes $(SOAK_MINUTES) --rate $(SOAK_RATE) --cap $(SOAK_CAP)

clean:
	rm -rf .keybrake .pytest_cache .mypy_cache .ruff_cache
