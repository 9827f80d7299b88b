#!/usr/bin/env bash
# Compile every CUDA source for sm_80 and sm_90 (compile only: no GPU needed) so that the
# CUDA code keeps building on machines without one. Usage: csrc/compile_check.sh [nvcc]
set -euo pipefail
cd "$(dirname "$0")"
NVCC="${1:-${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}}"
PYTHON="${PYTHON:-python3}"
INCLUDES=(-I.)
# The binding also needs the pybind11 and Python headers; check it when they are present.
if PYI=$("$PYTHON" -c 'import pybind11, sysconfig; print(pybind11.get_include(), sysconfig.get_paths()["include"])' 2>/dev/null); then
  for inc in $PYI; do INCLUDES+=("-I$inc"); done
  SOURCES=(*.cu cuda_bindings.cpp)
else
  echo "compile_check: pybind11 not importable by $PYTHON, skipping cuda_bindings.cpp" >&2
  SOURCES=(*.cu)
fi
for src in "${SOURCES[@]}"; do
  pids=()
  for arch in 80 90; do
    echo "nvcc sm_$arch $src"
    "$NVCC" -std=c++17 -O3 -Werror all-warnings -gencode "arch=compute_$arch,code=sm_$arch" \
      "${INCLUDES[@]}" -c "$src" -o /dev/null &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
done
echo "compile_check: all CUDA sources compile for sm_80 and sm_90"
