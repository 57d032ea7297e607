# moe_ref — every target sets itself up (idempotent: a stamp file skips work already done).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.moe_ref-setup
# The CPU build of torch lies on the dev machines' disk; install it first so that no
# dependency pulls a multi-GB CUDA build. Override on other machines: make TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))

.PHONY: setup test tour lab bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,notebooks,hf]"
	@touch $(STAMP)

## make test: lint, the unit tests, and every notebook under nbmake at smoke size.
test: setup
	$(BIN)/ruff check moe_ref kernels tests
	MOE_REF_SMOKE=1 TRITON_INTERPRET=1 $(BIN)/pytest -q tests $(if $(NOTEBOOKS),--nbmake $(NOTEBOOKS))

## make tour: execute every notebook headless (full size) and write HTML under build/tour/.
tour: setup
	@mkdir -p build/tour
	@if [ -z "$(NOTEBOOKS)" ]; then echo "no notebooks in notebooks/ yet: nothing to execute"; fi
	@for nb in $(NOTEBOOKS); do \
	  echo "executing $$nb"; \
	  TRITON_INTERPRET=1 $(BIN)/jupyter nbconvert --to html --execute \
	    --ExecutePreprocessor.timeout=600 --output-dir build/tour "$$nb" || exit 1; \
	done
	@echo "HTML written under build/tour/"

## make lab: JupyterLab on the notebooks.
lab: setup
	$(BIN)/jupyter lab notebooks/

## make bench: CPU benchmark of the strategies (JSON + PNG under build/bench/).
bench: setup
	$(BIN)/python -m moe_ref.bench

## make gpu-check: GPU tests and a quick benchmark sweep on a CUDA machine, < 8 min on one H200; uses the
## machine's python3 (PYTHON=...), installs nothing from the network; results under OUT (build/gpu-check/).
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build .pytest_cache .hypothesis
