# kvgen: `make` sets everything up and runs the demo; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all install generate build prune demo test test-gpu golden check-generated bench sanitize clean

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

# Remove generated sources, cubins and manifest rows the build matrix no longer asks for.
prune: $(STAMP)
	$(PY) -m kvgen prune

demo: $(STAMP)
	$(PY) -m kvgen demo

test: $(STAMP)
	$(PY) -m pytest -q

# On a CUDA machine: the GPU-marked tests (cubin vs Triton vs torch, graphs, >4 GiB, threads, golden).
# test-gpu and bench run the system interpreter $(PYTHON) (python3), not .venv: the
# GPU machine has no .venv (its image brings torch 2.11 cu130, triton and
# cuda-bindings, not CuteDSL), and it needs none -- the runtime is all they use,
# and `-m` from the checkout's root imports kvgen from the checkout.
test-gpu:
	$(PYTHON) -m pytest -q -m gpu

golden: $(STAMP)
	$(PY) -m tests.golden.corpus --update && $(PY) -m tests.golden.writer_corpus --update

# Regeneration must change nothing that is committed.
check-generated: generate
	@git status --porcelain -- generated/ | grep . && { echo "generated/ is stale: run make generate and commit"; exit 1; } || true

# On a CUDA machine, with $(PYTHON) as for test-gpu: the three benchmark families, then the plots.
bench:
	for family in dsv4 v41 sparse writer; do $(PYTHON) -m kvgen bench --family $$family --plot benchmarks/results/$$family.png || exit 1; done

# On a CUDA machine, with $(PYTHON) as for test-gpu: compute-sanitizer's memcheck, racecheck,
# initcheck and synccheck over every shipped cubin and every family; fails on any error.
sanitize:
	$(PYTHON) -m tests.sanitize

clean:
	rm -rf $(VENV) build *.egg-info
