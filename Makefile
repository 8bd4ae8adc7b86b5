# kvgen: `make` sets everything up and runs the demo; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all install generate build demo test test-gpu golden check-generated bench clean

all: install generate build demo

# torch is pinned to the CPU wheel on this project's machines: an unpinned
# torch would pull a multi-GB CUDA build. On a GPU machine, install your own
# torch first and skip this pin (TORCH_SPEC=).
TORCH_SPEC ?= torch==2.13.0

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e ".[build,test]"
	touch $(STAMP)

install: $(STAMP)

generate: $(STAMP)
	$(PY) -m kvgen generate

build: $(STAMP)
	$(PY) -m kvgen build

demo: $(STAMP)
	$(PY) -m kvgen demo

test: $(STAMP)
	$(PY) -m pytest -q

# On a CUDA machine: the GPU-marked tests (cubin vs Triton vs torch, graphs, >4 GiB, threads, golden).
test-gpu:
	$(PYTHON) -m pytest -q -m gpu

golden: $(STAMP)
	$(PY) -m tests.golden.corpus --update

# Regeneration must change nothing that is committed.
check-generated: generate
	@git status --porcelain -- generated/ | grep . && { echo "generated/ is stale: run make generate and commit"; exit 1; } || true

# On a CUDA machine: the three benchmark families, then the plots.
bench:
	for family in dsv4 v41 sparse; do $(PYTHON) -m kvgen bench --family $$family --plot benchmarks/results/$$family.png || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
