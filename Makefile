# Set-up and the two jobs of the README. `make demo` / `make test` create the
# virtual environment .venv on first use; `make docs` builds the API site.
#
# TORCH_SPEC pins torch only for this environment (the package itself asks for
# torch>=2.1): on the project's machines torch==2.13.0 is a local CPU wheel,
# where an unpinned `torch` would download a multi-GB CUDA build. Override it
# elsewhere, e.g. `make test TORCH_SPEC=torch`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench lint docs docs-browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[cli]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[cli,dev,bench]"
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[cli,docs]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/pyro-lunet demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n 2 -q

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench_layers.py --json benchmarks/results/bench_layers.json

# The API site, warnings as errors, into docs/_build/html (the tutorials executed in their
# quick mode), then a check that every internal link of the site resolves.
docs: $(VENV)/.installed-docs
	PYRO_LUNET_TUTORIAL_QUICK=1 $(BIN)/python -m sphinx -W --keep-going -b html -q docs docs/_build/html
	$(BIN)/python docs/check_links.py docs/_build/html

# The built site in headless Chromium (after `make docs`, which it does not redo: a build takes
# minutes): every page loaded, every internal link and #fragment followed in the browser, no
# console errors, screenshots in docs/_build/screenshots. Chromium and its driver are the
# system's (installed here when root with apt-get), Selenium comes with the docs extra. The
# checker's own test runs first: `make test` skips it while the browser is not yet installed.
docs-browser: $(VENV)/.installed-docs $(VENV)/.installed-dev
	@if ! command -v chromedriver >/dev/null || ! { command -v chromium || \
		command -v chromium-browser || command -v google-chrome; } >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq chromium chromium-driver; \
		else \
			echo "make docs-browser needs Chromium and ChromeDriver on the PATH; install" \
				"them (Debian: apt-get install chromium chromium-driver) and retry" >&2; \
			exit 1; \
		fi; \
	fi
	$(BIN)/python -m pytest -q tests/test_docs_browser.py
	$(BIN)/python docs/browser_check.py docs/_build/html

lint: $(VENV)/.installed-dev
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

clean:
	rm -rf $(VENV)
