// Python module fastinfluence.ops.backends._fi_cpu: the host twins, called with raw
// pointers (integers) so that the build does not depend on libtorch.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "fi_common.h"
#include "host_kernels.h"

namespace py = pybind11;

namespace {

template <typename T>
const T* cptr(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}
template <typename T>
T* mptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void jl_project(uintptr_t x, int dtype, int64_t B, int64_t D, int64_t ldx, uintptr_t out,
                int64_t k, uint64_t seed, int kind, uint64_t offset, float scale, int num_threads) {
  if (dtype != fi::kFloat32 && dtype != fi::kFloat16 && dtype != fi::kBFloat16)
    throw std::invalid_argument("jl_project: x must be float32, float16 or bfloat16");
  py::gil_scoped_release release;
  fi::jl_project_host(cptr<void>(x), dtype, B, D, ldx, mptr<float>(out), k, seed, kind, offset,
                      scale, num_threads);
}

void topk_merge(uintptr_t S, int dtype, int64_t Q, int64_t n, int64_t lds, int64_t index_offset,
                uintptr_t prev_values, uintptr_t prev_indices, int64_t kp, int64_t k_out,
                uintptr_t values, uintptr_t indices, int num_threads) {
  if (dtype != fi::kFloat32 && dtype != fi::kFloat64)
    throw std::invalid_argument("topk_merge: scores must be float32 or float64");
  py::gil_scoped_release release;
  if (dtype == fi::kFloat32) {
    fi::topk_merge_host(cptr<float>(S), Q, n, lds, index_offset, cptr<float>(prev_values),
                        cptr<int64_t>(prev_indices), kp, k_out, mptr<float>(values),
                        mptr<int64_t>(indices), num_threads);
  } else {
    fi::topk_merge_host(cptr<double>(S), Q, n, lds, index_offset, cptr<double>(prev_values),
                        cptr<int64_t>(prev_indices), kp, k_out, mptr<double>(values),
                        mptr<int64_t>(indices), num_threads);
  }
}

}  // namespace

// Keyword-only arguments: every one is an integer or a pointer, so a call with two of them
// swapped would still run; by name it cannot.
PYBIND11_MODULE(_fi_cpu, m) {
  m.doc() = "fastinfluence host kernels (C++/OpenMP twins of the CUDA kernels)";
  m.def("jl_project", &jl_project, "out (B, k) f32 = scale * x (B, D) @ R[offset:offset+D]", py::kw_only(),
        py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("ldx"), py::arg("out"), py::arg("k"),
        py::arg("seed"), py::arg("kind"), py::arg("offset"), py::arg("scale"), py::arg("num_threads"));
  m.def("topk_merge", &topk_merge, "per-row top-k of prev (Q, kp) and S (Q, n)", py::kw_only(), py::arg("S"),
        py::arg("dtype"), py::arg("Q"), py::arg("n"), py::arg("lds"), py::arg("index_offset"),
        py::arg("prev_values"), py::arg("prev_indices"), py::arg("kp"), py::arg("k_out"), py::arg("values"),
        py::arg("indices"), py::arg("num_threads"));
}
