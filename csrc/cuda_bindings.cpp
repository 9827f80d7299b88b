// Python module fastinfluence.ops.backends._fi_cuda: the CUDA kernels, called with raw
// device pointers and stream handles (integers) so that the build does not link libtorch.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cuda_kernels.h"
#include "fi_common.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

void jl_project(uintptr_t x, int dtype, int64_t B, int64_t D, int64_t ldx, uintptr_t out, int64_t k,
                uint64_t seed, int kind, uint64_t offset, float scale, uintptr_t ws, int64_t ws_chunks,
                uintptr_t stream) {
  if (dtype != fi::kFloat32 && dtype != fi::kFloat16 && dtype != fi::kBFloat16)
    throw std::invalid_argument("jl_project: x must be float32, float16 or bfloat16");
  check(fi::jl_project_cuda(ptr<const void>(x), dtype, B, D, ldx, ptr<float>(out), k, seed, kind,
                            offset, scale, ptr<float>(ws), ws_chunks, stream_of(stream)),
        "jl_project");
}

void topk_merge(uintptr_t S, int dtype, int64_t Q, int64_t n, int64_t lds, int64_t index_offset,
                uintptr_t prev_values, uintptr_t prev_indices, int64_t kp, int64_t k_out,
                uintptr_t values, uintptr_t indices, uintptr_t stream) {
  cudaError_t err;
  if (dtype == fi::kFloat32) {
    err = fi::topk_merge_cuda(ptr<const float>(S), Q, n, lds, index_offset, ptr<const float>(prev_values),
                              ptr<const int64_t>(prev_indices), kp, k_out, ptr<float>(values),
                              ptr<int64_t>(indices), stream_of(stream));
  } else if (dtype == fi::kFloat64) {
    err = fi::topk_merge_cuda(ptr<const double>(S), Q, n, lds, index_offset, ptr<const double>(prev_values),
                              ptr<const int64_t>(prev_indices), kp, k_out, ptr<double>(values),
                              ptr<int64_t>(indices), stream_of(stream));
  } else {
    throw std::invalid_argument("topk_merge: scores must be float32 or float64");
  }
  check(err, "topk_merge");
}

}  // namespace

PYBIND11_MODULE(_fi_cuda, m) {
  m.doc() = "fastinfluence CUDA kernels";
  m.def("jl_project", &jl_project, "out (B, k) f32 = scale * x (B, D) @ R[offset:offset+D]");
  m.def("topk_merge", &topk_merge, "per-row top-k of prev (Q, kp) and S (Q, n)");
}
