# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and
# install the package (with the pinned torch/torchvision pair) the first time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= artifacts/demo
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: install demo demo-run app test test-fast bench clean

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

app: install
	@if [ -f app/Home.py ]; then \
		$(PY) -m streamlit run app/Home.py --server.address 127.0.0.1 --server.headless true -- --run $(RUN); \
	else echo "the dashboard is not built yet; the run is in $(RUN)"; fi

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) scripts/bench_phantom.py

clean:
	rm -rf $(VENV) .pytest_cache
