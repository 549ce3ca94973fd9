# make demo: the main job on the embedded default (synthetic brain MRI), prints where the report is.
# make test: the whole test suite on both cores (slow end-to-end and browser tests included; the Ray engine's tests on a
#   local Ray cluster, which the venv's install of counterlens[ray] provides: demo does not need Ray).
# Both create .venv on first use and reuse it afterwards.
PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.counterlens-installed
CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test venv browser-deps bench-tabular clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,ray,keras]"
	@touch $(STAMP)

# The browser tests (tests/browser) drive Debian's Chromium through the Python package playwright.
# Never `playwright install`: it downloads its own browsers. Chromium comes from apt when this runs
# as root with apt-get; otherwise the browser tests skip and say why at the end of the pytest output
# (with COUNTERLENS_REQUIRE_BROWSER=1, as .ci/run sets, they fail instead).
browser-deps: $(STAMP)
	@$(BIN)/python -c "import playwright.sync_api" 2>/dev/null || \
	  $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt "playwright>=1.40"
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium with apt-get for the browser tests"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
	      { apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium >/dev/null; } || \
	      echo "WARNING: apt-get could not install chromium; the browser tests will be skipped"; \
	  else \
	    echo "WARNING: $(CHROMIUM) is missing and cannot be installed here (needs root and apt-get);" \
	         "the browser tests will be skipped"; \
	  fi; \
	fi

demo: $(STAMP)
	$(BIN)/counterlens demo

# One pytest worker per core (2 on the CI box; TEST_WORKERS=1 for one process), a test file per worker
# so module fixtures (trained models) are built once; each worker runs torch on cores / workers threads.
TEST_WORKERS ?= 2
test: $(STAMP) browser-deps
	COUNTERLENS_REQUIRE_RAY=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The head-to-head with DiCE (not part of make test): its own venv, so dice-ml never enters .venv.
bench-tabular:
	@test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install --quiet -c constraints.txt torch==2.13.0
	.venv-bench/bin/pip install --quiet -c constraints.txt -e ".[bench]"
	.venv-bench/bin/python benchmarks/tabular_counterfactual.py --dice-methods random,genetic \
	    --json benchmarks/results/tabular-dice.json --md benchmarks/results/tabular-dice.md

clean:
	rm -rf $(VENV) demo-run demo-run-work .pytest_cache test-artifacts
