# moe_ref — every target sets itself up (idempotent: a stamp file skips work already done).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.moe_ref-setup
# The CPU build of torch lies on the dev machines' disk; install it first so that no
# dependency pulls a multi-GB CUDA build. Override on other machines: make TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
# make test runs the suite on this many pytest-xdist workers, one torch thread each (OMP_NUM_THREADS=1 also
# reaches the notebook kernels and the torchrun children): two workers of two threads on two cores spin
# against each other
TEST_WORKERS ?= 2
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))

.PHONY: setup check test tour lab bench gpu-check clean browser-deps

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,notebooks,hf]"
	@touch $(STAMP)

## make browser-deps: Debian's chromium for tests/test_browser.py (apt-get when root; never a browser download).
browser-deps:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the browser test (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
	    || echo "NOTE: apt-get install chromium failed: tests/test_browser.py will fail under CI=true"; \
	else \
	  echo "NOTE: /usr/bin/chromium missing (not root or no apt-get): install Debian's chromium;"; \
	  echo "      tests/test_browser.py skips without it, and fails when CI=true"; \
	fi

## make check: the fast tier for the edit-test loop (< 60 s): lint, the layering rules, the unit tests not
## marked slow (no notebooks, browser, torchrun or GPU-run dry run).
check: setup
	$(BIN)/ruff check moe_ref tests
	MOE_REF_SMOKE=1 TRITON_INTERPRET=1 MOE_REF_HYPOTHESIS_EXAMPLES=8 $(BIN)/pytest -q -m "not slow" -n 2 --dist worksteal \
	  -p no:cacheprovider -p no:nbmake tests

## make test: lint, the unit tests (incl. the real-browser notebook test), every notebook under nbmake.
## It changes nothing on the system: the browser comes from `make browser-deps` (what .ci/run calls first).
test: setup
	$(BIN)/ruff check moe_ref tests
	OMP_NUM_THREADS=1 MOE_REF_SMOKE=1 TRITON_INTERPRET=1 $(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal -p no:cacheprovider \
	  --durations=15 tests $(if $(NOTEBOOKS),--nbmake $(NOTEBOOKS))

## make tour: execute every notebook headless (full size) and write HTML under build/tour/.
tour: setup
	@mkdir -p build/tour
	@if [ -z "$(NOTEBOOKS)" ]; then echo "no notebooks in notebooks/ yet: nothing to execute"; fi
	@for nb in $(NOTEBOOKS); do \
	  echo "executing $$nb"; start=$$(date +%s); \
	  MOE_REF_SMOKE=0 TRITON_INTERPRET=1 $(BIN)/jupyter nbconvert --to html --execute \
	    --ExecutePreprocessor.timeout=600 --output-dir build/tour "$$nb" || exit 1; \
	  echo "  $$nb: $$(( $$(date +%s) - start )) s"; \
	done
	@echo "HTML written under build/tour/"

## make lab: JupyterLab on the notebooks (--allow-root only when run as root); more options: make lab LAB_ARGS="--port 8889"
LAB_ARGS ?=
lab: setup
	@echo "JupyterLab on notebooks/: open the http://127.0.0.1:...?token=... URL it prints below (Ctrl-C stops it)"
	$(BIN)/jupyter lab notebooks/ $$(if [ "$$(id -u)" = 0 ]; then echo --allow-root; fi) $(LAB_ARGS)

## make bench: CPU benchmark of the strategies (JSON + PNG under build/bench/).
bench: setup
	$(BIN)/python -m moe_ref.bench cpu

## make gpu-check: GPU tests, a benchmark sweep and tuning on a CUDA machine in about 510 s; uses the
## machine's python3 (PYTHON=...), installs nothing from the network; results under OUT (build/gpu-check/).
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build .pytest_cache .hypothesis
