// Arguments of the CUDA factorised projection (project.cu), shared with the binding.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fi {

// One side of the projection: X (B, T, d) with unit stride along d, projected by P.
struct ProjectSide {
  const void* x;             // (B, T, d) in the input dtype
  int64_t stride_b, stride_t;  // element strides of X
  int64_t d;
  const void* p;  // (d, kp) contiguous in the input dtype, zero in columns >= k
  int vec;        // 1: rows and X are 16-byte aligned and d is a multiple of 16 bytes (cp.async)
};

struct ProjectArgs {
  ProjectSide a, g;           // a: A with P_in; g: G with P_out
  const float* bias;          // (k_in,) float32 bias row of P_in, or null
  const uint8_t* mask;        // (B, T) nonzero for tokens that count, or null for all
  int64_t mask_sb, mask_st;   // element strides of mask
  int64_t B, T, k_in, k_out;
  int64_t tokens_per_split;   // tokens of one CTA, a multiple of kProjectTokenTile
  float* partial;             // (splits, B, k_out, k_in) float32, one slice per token split
};

constexpr int kProjectTokenTile = 64;  // tokens per tile; token splits are multiples of it

// partial[s, b] = sum over tokens t of split s of (g_t P_out)^T (a_t P_in + bias), for
// masked-in tokens only. dtype: kFloat32 (TF32 products), kFloat16 or kBFloat16; kp is
// the padded rank 32, 64 or 128 (>= k_in, k_out). Needs compute capability 8.0 or newer.
cudaError_t project_cuda(const ProjectArgs& args, int dtype, int kp, int64_t splits, cudaStream_t stream);

}  // namespace fi
