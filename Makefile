# Two entry points: `make demo` and `make test`. Both create .venv on a fresh machine: the demo installs
# what it imports, the tests add the test, peft, triton and faiss extras (in either order).
# Without a GPU the CPU build of torch is used (small and fast to install).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: setup demo demo-quick test test-open-unlearning-pin check-cuda check-triton gpu-suite bench bench-peers clean

setup: $(VENV)/.installed

# What the demo imports: torch, the package (its C++ kernels built; accelerate comes with it, as
# transformers' Trainer needs it) and matplotlib for the plots.
$(VENV)/.demo-installed: pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e . matplotlib
	touch $@

# Everything else: tests, linters, the optional backends and integrations.
$(VENV)/.installed: $(VENV)/.demo-installed
	$(BIN)/python -m pip install -q -e ".[test,peft,triton,faiss]"
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/python -m fastinfluence demo

# About a minute on 2 cores; checks the report's keys and loose bounds (CI).
demo-quick: $(VENV)/.demo-installed
	$(BIN)/python -m fastinfluence demo --quick --out demo_out_quick
	$(BIN)/python -m fastinfluence.demo.report demo_out_quick/report.json --quick

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# open-unlearning pins transformers 4.45.1: the integration tests run under it too, in a light
# second virtualenv (CI). The main suite runs under the transformers 5.x that `make setup` installs.
OU_VENV ?= .venv-transformers445
test-open-unlearning-pin:
	test -x $(OU_VENV)/bin/python || $(PYTHON) -m venv $(OU_VENV)
	$(OU_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" "transformers==4.45.1" "peft==0.13.2" \
		"accelerate>=1.1.0" safetensors numpy tqdm pytest pybind11 setuptools wheel
	$(OU_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(OU_VENV)/bin/python -m pytest -q tests/test_open_unlearning.py tests/test_evaluate_open_unlearning.py

# Compile every CUDA source for sm_80 and sm_90 (no GPU needed); skipped without nvcc.
check-cuda: setup
	@if command -v nvcc >/dev/null 2>&1; then PYTHON=$(abspath $(BIN)/python) bash csrc/compile_check.sh; \
	else echo "check-cuda: nvcc not found, skipped"; fi

# Compile every Triton kernel for sm_90 with Triton's own ptxas (no GPU needed): registers, spills.
check-triton: setup
	env -u TRITON_INTERPRET $(BIN)/python -m fastinfluence.triton_kernels.compile_check

# On a GPU machine: install, build CUDA, pytest -m gpu, GPU benchmarks; JSON under $$OUT.
gpu-suite:
	OUT=$${OUT:-gpu_out} bash bench/gpu_suite.sh

# CPU benchmarks (several minutes; scoring writes a 4 GB temporary store), then the README table.
# Timing suites: pytest-benchmark over bench/test_*.py in CPU seconds, converted into
# bench/results/pytest_bench_cpu.json and ops_cpu.json; memory and cross-package benches stay scripts.
BENCH_JSON ?= bench/results/.pytest_bench_raw.json
bench: setup
	$(BIN)/python -m pytest bench/ -q --benchmark-json=$(BENCH_JSON) --benchmark-timer=time.process_time
	$(BIN)/python bench/results_from_benchmark.py $(BENCH_JSON)
	$(BIN)/python bench/extract_vs_train.py
	$(BIN)/python bench/extract_memory.py
	$(BIN)/python bench/bench_jl_project.py
	$(BIN)/python bench/bench_linear_cross_entropy.py
	$(BIN)/python bench/bench_scoring.py
	$(BIN)/python bench/truncated_backward.py
	$(BIN)/python bench/storeless.py
	$(BIN)/python bench/report.py --update README.md

# Peer comparison (tens of minutes per shape): one virtualenv per peer under .peers/, interleaved runs.
# PEER_SHAPES=real: the real-shape workloads (Qwen2 widths at vocabulary 151,936 x 512 tokens and
# 32,000 x 1,024), bench/results/peers_realshape_cpu.json, the README's headline; toy: the 4-layer
# vocabulary-512 Llama, bench/results/peers_cpu.json and docs/peers_cpu.svg. Then the README tables.
# PEER_REPS=1 for a quick look.
PEER_REPS ?= 2
PEER_SHAPES ?= real toy
bench-peers: setup
	PYTHON=$(PYTHON) bash bench/peers/setup.sh
	for shape in $(PEER_SHAPES); do $(BIN)/python bench/peers/run_all.py --shape $$shape --reps $(PEER_REPS) || exit 1; done
	$(BIN)/python bench/report.py --update README.md

clean:
	rm -rf $(VENV) build *.egg-info
