#!/usr/bin/env bash
# One call on a lent GPU machine: install, build the CUDA extension, run the GPU tests and
# every bench/gpu_*.py, and leave logs and JSON under $OUT (see /work/shared/GPU.md):
#
#   OUT=/tmp/gpu_out bash bench/gpu_suite.sh
#
# Stages fit one 10-minute call; each has its own time limit so that a hang costs only
# that stage. SKIP_BUILD=1, SKIP_TESTS=1 or SKIP_BENCH=1 leave a stage out. The table of
# results is printed last; commit $OUT/*.json to bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

stage() { echo "== $1 ($(date +%T))"; }

stage "environment"
{
    nvidia-smi || true
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name())"
    git rev-parse HEAD 2>/dev/null || echo "commit unknown (no .git here)"
} >"$OUT/env.txt" 2>&1
tail -n 2 "$OUT/env.txt"

stage "install"
if ! timeout 180 "$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    echo "install failed (see install.log); using the source tree on PYTHONPATH"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    stage "CUDA extension"
    if "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('fastinfluence.ops.backends.cuda') is None)" 2>/dev/null; then
        timeout 240 "$PY" -m fastinfluence.ops.backends.cuda --build >"$OUT/cuda_build.log" 2>&1 \
            && echo "built" || echo "CUDA build failed or unavailable (see cuda_build.log); continuing"
    else
        echo "no fastinfluence.ops.backends.cuda module; skipped"
    fi
fi

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    stage "pytest -m gpu"
    # Tests check the kernels' first configs; the benchmarks autotune and check their choice.
    FASTINFLUENCE_TRITON_AUTOTUNE=0 timeout 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" >"$OUT/pytest_gpu.log" 2>&1
    echo "pytest exit code $?"
    grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.log" | head -n 20
    tail -n 1 "$OUT/pytest_gpu.log"
fi

if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
    stage "floors"
    timeout 60 "$PY" bench/gpu_floors.py --out "$OUT" >"$OUT/gpu_floors.log" 2>&1 || echo "floors failed (see gpu_floors.log)"
    for script in bench/gpu_*.py; do
        name=$(basename "$script" .py)
        [[ "$name" == gpu_floors ]] && continue
        stage "$name"
        timeout 300 "$PY" "$script" --out "$OUT" >"$OUT/$name.log" 2>&1 || echo "$name failed (see $name.log)"
    done
fi

stage "results"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

for path in sorted(Path(sys.argv[1]).glob("*.json")):
    data = json.loads(path.read_text())
    meta = data.get("meta", {})
    print(f"\n{path.name}: {meta.get('device', '?')}, commit {str(meta.get('commit', '?'))[:10]}, "
          f"torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, CUDA {meta.get('cuda', '?')}")
    for r in data.get("rows", []):
        extra = "  ".join(f"{k}={r[k]}" for k in ("value", "unit", "rel_err", "grad_rel_err", "peak_mem_mb", "time_vs_materialised", "mem_vs_materialised") if k in r)
        pct = f"{r['pct_of_floor']:5.1f}%" if "pct_of_floor" in r else "      "
        ms = f"{r['ms']:9.3f} ms" if "ms" in r else " " * 12
        print(f"  {r.get('kernel', ''):<21} {r.get('provider', ''):<28} {ms} {pct}  {r.get('shape', '')}  {extra}")
EOF
