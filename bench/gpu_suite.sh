#!/usr/bin/env bash
# The GPU suite: install, build the CUDA extension, run the GPU tests and the GPU benchmarks,
# all within one 600 s call, and leave at most 8 files under $OUT. Run it from the checkout,
# as is (about 6-7 minutes on an H200; pass the commit, the copy of the tree has no .git):
#
#   FASTINFLUENCE_COMMIT=<git rev-parse HEAD> SUITE_BUDGET_S=540 bash bench/gpu_suite.sh
#
# When the window is short, in two calls (tests first, then benchmarks):
#
#   FASTINFLUENCE_COMMIT=<git rev-parse HEAD> SUITE_BUDGET_S=300 SKIP_BENCH=1 bash bench/gpu_suite.sh
#   FASTINFLUENCE_COMMIT=<git rev-parse HEAD> SUITE_BUDGET_S=420 SKIP_TESTS=1 bash bench/gpu_suite.sh
#
# $OUT (default ./gpu_out) receives summary.txt (stages, test failures, every result row),
# suite.tar.gz (every log, the pytest XML and each bench's JSON) and the result JSON files
# (commit those to bench/results/). They are rewritten after every stage, so a run cut short
# keeps what finished. SUITE_BUDGET_S (default 540) is the whole run: each stage gets at most
# its own cap and what is left of the budget, and is skipped when too little is left.
# GPU_TEST_TIMEOUT_S (default 60) bounds each test. SKIP_INSTALL=1, SKIP_BUILD=1,
# SKIP_TESTS=1, SKIP_BENCH=1 leave stages out. Without a CUDA device it says so and exits 0.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${OUT:-$ROOT/gpu_out}" && cd "${OUT:-$ROOT/gpu_out}" && pwd)  # relative to the caller's directory
cd "$ROOT"
PY=${PYTHON:-python3}
export ROOT PY
BUDGET=${SUITE_BUDGET_S:-540}
RESERVE=10  # seconds kept for the last packing
export PYTHONUNBUFFERED=1 GPU_TEST_TIMEOUT_S=${GPU_TEST_TIMEOUT_S:-60}
unset TRITON_INTERPRET
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
START=$SECONDS

echo "fastinfluence GPU suite: FASTINFLUENCE_COMMIT=${FASTINFLUENCE_COMMIT:-} SUITE_BUDGET_S=$BUDGET" \
    "SKIP_TESTS=${SKIP_TESTS:-0} SKIP_BENCH=${SKIP_BENCH:-0}"
if [[ -z "${FASTINFLUENCE_COMMIT:-}" ]]; then
    FASTINFLUENCE_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
fi
export FASTINFLUENCE_COMMIT

pack() {
    "$PY" "$ROOT/bench/gpu_suite_lib.py" pack --work "$WORK" --out "$OUT" || echo "packing reported problems (see summary.txt)"
}
trap 'record interrupted killed 0 "the suite was stopped"; pack; exit 130' INT TERM
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$WORK/stages.tsv"; }
left() { echo $((BUDGET - (SECONDS - START) - RESERVE)); }

# stage NAME CAP_S MIN_S LOG CMD...: run CMD with a time limit of min(CAP_S, budget left), log
# to $WORK/LOG; skipped when less than MIN_S is left. Records the outcome, then packs.
stage() {
    local name=$1 cap=$2 min=$3 log=$4
    shift 4
    local avail limit t0 rc status note=""
    avail=$(left)
    if ((avail < min)); then
        echo "== $name: skipped, ${avail}s of the budget left (needs ${min}s)"
        record "$name" skipped 0 "budget: ${avail}s left, needs ${min}s"
        pack
        return 99
    fi
    limit=$((cap < avail ? cap : avail))
    echo "== $name ($(date +%T), limit ${limit}s)"
    t0=$SECONDS
    timeout -k 5 "$limit" bash -c '"$@"' bash "$@" >"$WORK/$log" 2>&1  # bash -c: CMD may be a function
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout note="stopped at its ${limit}s limit" ;;
        *) status=failed note="exit code $rc" ;;
    esac
    echo "   $status after $((SECONDS - t0))s ${note:+($note) }-> $log"
    [[ $status == ok ]] || tail -n 3 "$WORK/$log" | sed 's/^/   | /'
    record "$name" "$status" $((SECONDS - t0)) "$note"
    pack
    return $rc
}

environment() {
    nvidia-smi || echo "nvidia-smi: not available"
    "$PY" - <<'EOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (no CUDA device)")
EOF
    echo "commit $FASTINFLUENCE_COMMIT"
}
export -f environment

stage environment 30 5 env.txt environment
if ! grep -q "^device " "$WORK/env.txt" || grep -q "^device none" "$WORK/env.txt"; then
    echo "no CUDA device here (or no torch for $PY; see env.txt): install, build, tests and benchmarks skipped"
    record gpu skipped 0 "no CUDA device (or no torch for $PY): nothing run"
    pack
    rm -rf "$WORK" "${WORK}_overlay"
    echo "results: $OUT"
    exit 0
fi

# The package must import from outside the tree, fastinfluence.triton_kernels included.
imports() {
    (cd / && "$PY" -c "import fastinfluence.triton_kernels as t, fastinfluence as f; print(f.__file__, t.__file__)")
}
install() {
    "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . && imports
}
export -f imports install
if [[ "${SKIP_INSTALL:-0}" == 1 ]] || imports 2>/dev/null | grep -q "^$ROOT/"; then
    echo "== install: the tree at $ROOT already imports; skipped"
    record install skipped 0 "already installed from $ROOT"
elif ! stage install 150 20 install.log install; then
    # Without an install: the tree on PYTHONPATH and a finder for the folders setup.py maps.
    OVERLAY=$("$PY" bench/gpu_suite_lib.py overlay --root "$ROOT" --dest "${WORK}_overlay")
    export PYTHONPATH="$OVERLAY:$ROOT${PYTHONPATH:+:$PYTHONPATH}" FASTINFLUENCE_CSRC="$ROOT/csrc"
    if imports >>"$WORK/install.log" 2>&1; then
        record install-fallback ok 0 "PYTHONPATH=$OVERLAY:$ROOT"
    else
        record install-fallback failed 0 "fastinfluence does not import (see install.log)"
    fi
fi

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    stage "CUDA extension" 180 30 cuda_build.log "$PY" -m fastinfluence.ops.backends.cuda --build
fi

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    # Tests check the kernels' first configs; the benchmarks autotune and check their choice.
    stage "pytest -m gpu" 240 30 pytest_gpu.log \
        env FASTINFLUENCE_TRITON_AUTOTUNE=0 PYTHONPATH="$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}" \
        "$PY" -m pytest -m gpu -q -p no:cacheprovider -p gpu_test_timeout --junitxml="$WORK/pytest_gpu.xml"
    if [[ -f "$WORK/pytest_gpu.log" ]]; then
        grep -E "^(FAILED|ERROR)" "$WORK/pytest_gpu.log" | head -n 20
        tail -n 1 "$WORK/pytest_gpu.log"
    fi
fi

if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
    stage floors 60 20 gpu_floors.log "$PY" bench/gpu_floors.py --out "$WORK"
    bench() { stage "$1" "$2" "$3" "$1.log" "$PY" "bench/$1.py" --out "$WORK" --floors "$WORK/floors.json"; }
    bench gpu_bench_triton 200 45
    bench gpu_project_cuda 90 30
    bench gpu_jl_project 120 30
fi

record total done $((SECONDS - START)) "budget ${BUDGET}s"
pack
trap - INT TERM
echo
cat "$OUT/summary.txt"
rm -rf "$WORK" "${WORK}_overlay"
echo "results: $OUT"
