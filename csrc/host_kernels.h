// Host twins of the CUDA kernels (C++/OpenMP). Pointers are raw host memory; matrices
// are row-major with the given leading dimension (elements between rows).
#pragma once

#include <cstdint>

namespace fi {

// out (B, k) float32 = scale * x (B, D) @ R[offset : offset + D] (see jl_entries.h).
// dtype: kFloat32, kFloat16 or kBFloat16 for x. Bit-identical to the CUDA kernel.
void jl_project_host(const void* x, int dtype, int64_t B, int64_t D, int64_t ldx, float* out,
                     int64_t k, uint64_t seed, int kind, uint64_t offset, float scale,
                     int num_threads);

// Per-row top-k of the candidates prev (Q, kp) and S (Q, n) with indices
// index_offset + column, in topk_order.h order. Writes k_out = min(k, kp + n) columns
// to values / indices (Q, k_out). T is float or double.
template <typename T>
void topk_merge_host(const T* S, int64_t Q, int64_t n, int64_t lds, int64_t index_offset,
                     const T* prev_values, const int64_t* prev_indices, int64_t kp,
                     int64_t k_out, T* values, int64_t* indices, int num_threads);

}  // namespace fi
