# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv if
# missing, installs what it needs once (stamp files make the second run quick), builds
# the native extension when csrc/ changed, and runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# torch 2.13.0's CPU build installs from a file on this machine; never let pip resolve
# a bare `torch` (that is a multi-GB CUDA wheel).
TORCH  ?= torch==2.13.0
DEPS   := $(VENV)/.deps-stamp
BUILT  := $(VENV)/.build-stamp
NATIVE := $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu) acf_fast/backends/source_hash.py setup.py pyproject.toml
PYTEST_ARGS ?=

.PHONY: demo test build bench cmake-build clean help

help:
	@echo "make demo   - synthetic data -> prepare -> train -> evaluate -> explain"
	@echo "make test   - the test suite (Triton kernels under TRITON_INTERPRET=1, compile checks, CMake build)"
	@echo "make bench  - benchmarks: pytest benchmarks/ --benchmark"
	@echo "make build  - (re)build the native extension"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): $(PY) requirements-dev.txt
	$(PIP) install "$(TORCH)"
	$(PIP) install -r requirements-dev.txt
	touch $@

$(BUILT): $(DEPS) $(NATIVE)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

demo: $(BUILT)
	$(PY) -m acf_fast demo --out demo_out

# The CMake build of the same extension runs in every test run so it never rots.
cmake-build: $(DEPS)
	@mkdir -p build
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DPython3_EXECUTABLE=$(abspath $(PY)) > build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)
	cmake --build build/cmake >> build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)

# ACF_FAST_REQUIRE_BACKENDS=1: a missing extension or triton fails the fused-backend
# tests instead of skipping them, so `make test` cannot pass without covering them.
test: $(BUILT) cmake-build
	TRITON_INTERPRET=1 ACF_FAST_REQUIRE_BACKENDS=1 $(PY) -m pytest tests -q $(PYTEST_ARGS)

bench: $(BUILT)
	$(PY) -m pytest benchmarks/ --benchmark -q $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info acf_fast/_C*.so $(BUILT)
