// Launchers of the CUDA kernels (jl_project.cu, topk.cu). Pointers are device memory;
// matrices are row-major with the given leading dimension. All work is queued on stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fi {

// out (B, k) float32 = scale * x (B, D) @ R[offset : offset + D], bit-identical to
// jl_project_host. ws: workspace of ws_chunks * B * k floats (ws_chunks >= 1); more
// chunks in flight give more parallelism, never a different result.
cudaError_t jl_project_cuda(const void* x, int dtype, int64_t B, int64_t D, int64_t ldx,
                            float* out, int64_t k, uint64_t seed, int kind, uint64_t offset,
                            float scale, float* ws, int64_t ws_chunks, cudaStream_t stream);

// Same contract as topk_merge_host (host_kernels.h); T is float or double.
template <typename T>
cudaError_t topk_merge_cuda(const T* S, int64_t Q, int64_t n, int64_t lds, int64_t index_offset,
                            const T* prev_values, const int64_t* prev_indices, int64_t kp,
                            int64_t k_out, T* values, int64_t* indices, cudaStream_t stream);

}  // namespace fi
