# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and
# install the package (with the pinned torch/torchvision pair) the first time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= artifacts/demo
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: install demo demo-run app browser test test-fast bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	@$(PY) -c "import sae_cxr, torch, torchvision, open_clip" || (echo "installation failed" >&2; exit 1)
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

demo: demo-run app

demo-run: install
	$(PY) -m sae_cxr.cli demo --out $(RUN)

PORT ?= 8501
app: install
	@echo "dashboard on http://127.0.0.1:$(PORT) (run $(RUN); Ctrl-C stops it)"
	$(PY) -m streamlit run app/Home.py --server.address 127.0.0.1 --server.port $(PORT) --server.headless true \
		--browser.gatherUsageStats false --client.toolbarMode viewer -- --run $(RUN)

# The dashboard's end-to-end test drives Debian's chromium through chromedriver; installed once if missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver) >/dev/null 2>&1 \
		  || echo "chromium could not be installed: the browser test will be skipped"; }

test: install browser
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) scripts/bench_phantom.py

clean:
	rm -rf $(VENV) .pytest_cache
