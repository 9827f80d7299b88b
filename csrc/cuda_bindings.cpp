// Python module fastinfluence.ops.backends._fi_cuda: the CUDA kernels, called with raw
// device pointers and stream handles (integers) so that the build does not link libtorch.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cuda_kernels.h"
#include "fi_common.h"
#include "project.h"

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

void project(uintptr_t A, int64_t a_sb, int64_t a_st, int64_t d_in, uintptr_t P_in, bool a_vec,
             uintptr_t G, int64_t g_sb, int64_t g_st, int64_t d_out, uintptr_t P_out, bool g_vec, int dtype,
             int kp, uintptr_t bias, uintptr_t mask, int64_t mask_sb, int64_t mask_st, int64_t B, int64_t T,
             int64_t k_in, int64_t k_out, int64_t tokens_per_split, int64_t splits, uintptr_t partial,
             uintptr_t stream) {
  if (dtype != fi::kFloat32 && dtype != fi::kFloat16 && dtype != fi::kBFloat16)
    throw std::invalid_argument("project: A and G must both be float32, float16 or bfloat16");
  if (kp != 32 && kp != 64 && kp != 128)
    throw std::invalid_argument("project: the padded rank must be 32, 64 or 128, got " + std::to_string(kp));
  if (k_in < 1 || k_out < 1 || k_in > kp || k_out > kp)
    throw std::invalid_argument("project: ranks k_in=" + std::to_string(k_in) + ", k_out=" + std::to_string(k_out) +
                                " must lie in [1, " + std::to_string(kp) + "]");
  if (B < 1 || B > 0x7fffffff || T < 1 || d_in < 1 || d_out < 1)
    throw std::invalid_argument("project: B, T, d_in and d_out must be positive (B < 2^31)");
  if (splits < 1 || splits > 65535 || tokens_per_split % fi::kProjectTokenTile != 0 ||
      (splits - 1) * tokens_per_split >= T)
    throw std::invalid_argument("project: splits must be in [1, 65535], each a nonempty multiple of " +
                                std::to_string(fi::kProjectTokenTile) + " tokens");
  fi::ProjectArgs args{};
  args.a = {ptr<const void>(A), a_sb, a_st, d_in, ptr<const void>(P_in), a_vec ? 1 : 0};
  args.g = {ptr<const void>(G), g_sb, g_st, d_out, ptr<const void>(P_out), g_vec ? 1 : 0};
  args.bias = ptr<const float>(bias);
  args.mask = ptr<const uint8_t>(mask);
  args.mask_sb = mask_sb;
  args.mask_st = mask_st;
  args.B = B;
  args.T = T;
  args.k_in = k_in;
  args.k_out = k_out;
  args.tokens_per_split = tokens_per_split;
  args.partial = ptr<float>(partial);
  check(fi::project_cuda(args, dtype, kp, splits, stream_of(stream)), "project");
}

}  // namespace

// Keyword-only arguments, as in host_bindings.cpp: integers and pointers swapped by position
// would run silently.
PYBIND11_MODULE(_fi_cuda, m) {
  m.doc() = "fastinfluence CUDA kernels";
  m.def("jl_project", &jl_project, "out (B, k) f32 = scale * x (B, D) @ R[offset:offset+D]", py::kw_only(),
        py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("ldx"), py::arg("out"), py::arg("k"),
        py::arg("seed"), py::arg("kind"), py::arg("offset"), py::arg("scale"), py::arg("ws"), py::arg("ws_chunks"),
        py::arg("stream"));
  m.def("project", &project, "partial (splits, B, k_out, k_in) f32 = per-split sums of (G P_out)^T (A P_in)",
        py::kw_only(), py::arg("A"), py::arg("a_sb"), py::arg("a_st"), py::arg("d_in"), py::arg("P_in"),
        py::arg("a_vec"), py::arg("G"), py::arg("g_sb"), py::arg("g_st"), py::arg("d_out"), py::arg("P_out"),
        py::arg("g_vec"), py::arg("dtype"), py::arg("kp"), py::arg("bias"), py::arg("mask"), py::arg("mask_sb"),
        py::arg("mask_st"), py::arg("B"), py::arg("T"), py::arg("k_in"), py::arg("k_out"),
        py::arg("tokens_per_split"), py::arg("splits"), py::arg("partial"), py::arg("stream"));
  m.def("topk_merge", &topk_merge, "per-row top-k of prev (Q, kp) and S (Q, n)", py::kw_only(), py::arg("S"),
        py::arg("dtype"), py::arg("Q"), py::arg("n"), py::arg("lds"), py::arg("index_offset"),
        py::arg("prev_values"), py::arg("prev_indices"), py::arg("kp"), py::arg("k_out"), py::arg("values"),
        py::arg("indices"), py::arg("stream"));
}
