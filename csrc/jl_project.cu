// CUDA jl_project: out = scale * x @ R with R generated in registers (jl_entries.h).
//
// Each thread owns kColsPerThread columns of R and walks down the rows of one kJlChunk
// chunk, refreshing its Philox words once per block of rows, while a tile of TB rows of x
// waits in shared memory. Chunk partial sums go to a workspace; a second kernel adds them
// in chunk order. The summation order is fixed by (D, offset) alone, so every GPU model,
// grid size and batch split, and the host twin, give the same bits.
#include "cuda_kernels.h"
#include "fi_convert.h"
#include "jl_entries.h"

namespace fi {
namespace {

constexpr int kThreads = 128;
constexpr int kColsPerThread = 2;
constexpr int kTileCols = kThreads * kColsPerThread;
constexpr int kSub = 256;  // rows of x staged in shared memory at a time

template <typename In, int KIND, int TB>
__global__ void __launch_bounds__(kThreads)
    jl_partial_kernel(const In* __restrict__ x, int64_t B, int64_t D, int64_t ldx, int64_t k,
                      uint64_t seed, uint64_t offset, int64_t chunk0, float* __restrict__ ws) {
  __shared__ __align__(16) float xs[TB][kSub];
  const int64_t j_base = static_cast<int64_t>(blockIdx.x) * kTileCols + threadIdx.x;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * TB;
  const int64_t d_begin = (chunk0 + blockIdx.z) * kJlChunk;
  const int64_t d_end = imin(D, d_begin + kJlChunk);
  const int shift = jl_block_shift(KIND);

  float acc[kColsPerThread][TB];
  U32x4 words[kColsPerThread];
  float gauss[kColsPerThread][4];
#pragma unroll
  for (int c = 0; c < kColsPerThread; ++c)
#pragma unroll
    for (int b = 0; b < TB; ++b) acc[c][b] = 0.0f;
  uint64_t current = ~0ull;  // block of the cached words; no real block has this index

  for (int64_t s0 = d_begin; s0 < d_end; s0 += kSub) {
    const int n = static_cast<int>(imin(kSub, d_end - s0));
    const int n4 = (n + 3) & ~3;  // zero-padded rows add +-0 to a sum that is never -0
    __syncthreads();
    for (int i = threadIdx.x; i < TB * n4; i += kThreads) {
      const int b = i / n4, dd = i - b * n4;
      xs[b][dd] = (b0 + b < B && dd < n) ? to_float(x[(b0 + b) * ldx + s0 + dd]) : 0.0f;
    }
    __syncthreads();
    for (int dd = 0; dd < n4; dd += 4) {
      float r[kColsPerThread][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint64_t gd = offset + static_cast<uint64_t>(s0 + dd + i);
        const uint64_t block = gd >> shift;
        if (block != current) {
          current = block;
#pragma unroll
          for (int c = 0; c < kColsPerThread; ++c) {
            words[c] = jl_words(seed, KIND, block, static_cast<uint32_t>(j_base + c * kThreads));
            if (KIND == kGaussian) jl_gaussian4(words[c], gauss[c]);
          }
        }
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) {
          if (KIND == kRademacher) {
            r[c][i] = jl_rademacher(words[c], gd);
          } else {
            const uint32_t g = gd & 3;
            r[c][i] = g == 0 ? gauss[c][0] : g == 1 ? gauss[c][1] : g == 2 ? gauss[c][2] : gauss[c][3];
          }
        }
      }
#pragma unroll
      for (int b = 0; b < TB; ++b) {
        const float4 xv = *reinterpret_cast<const float4*>(&xs[b][dd]);
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) {
          acc[c][b] = fmaf(xv.x, r[c][0], acc[c][b]);
          acc[c][b] = fmaf(xv.y, r[c][1], acc[c][b]);
          acc[c][b] = fmaf(xv.z, r[c][2], acc[c][b]);
          acc[c][b] = fmaf(xv.w, r[c][3], acc[c][b]);
        }
      }
    }
  }
  float* part = ws + static_cast<int64_t>(blockIdx.z) * B * k;
#pragma unroll
  for (int c = 0; c < kColsPerThread; ++c) {
    const int64_t j = j_base + c * kThreads;
#pragma unroll
    for (int b = 0; b < TB; ++b)
      if (j < k && b0 + b < B) part[(b0 + b) * k + j] = acc[c][b];
  }
}

// out = (first ? 0 : out) + ws[0] + ... + ws[chunks - 1], in that order; times scale if last.
__global__ void jl_reduce_kernel(const float* __restrict__ ws, int64_t chunks, int64_t size,
                                 float* __restrict__ out, float scale, bool first, bool last) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= size) return;
  float total = first ? 0.0f : out[i];
  for (int64_t c = 0; c < chunks; ++c) total = __fadd_rn(total, ws[c * size + i]);
  out[i] = last ? __fmul_rn(total, scale) : total;
}

template <typename In, int KIND, int TB>
void launch_partial(const void* x, int64_t B, int64_t D, int64_t ldx, int64_t k, uint64_t seed,
                    uint64_t offset, int64_t chunk0, int64_t chunks, float* ws, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((k + kTileCols - 1) / kTileCols),
                  static_cast<unsigned>((B + TB - 1) / TB), static_cast<unsigned>(chunks));
  jl_partial_kernel<In, KIND, TB><<<grid, kThreads, 0, stream>>>(
      static_cast<const In*>(x), B, D, ldx, k, seed, offset, chunk0, ws);
}

using PartialLauncher = void (*)(const void*, int64_t, int64_t, int64_t, int64_t, uint64_t,
                                 uint64_t, int64_t, int64_t, float*, cudaStream_t);

template <typename In, int KIND>
PartialLauncher pick_tile(int64_t B) {
  // The smallest row tile that covers B (up to 32): entries are generated once per tile.
  if (B <= 1) return launch_partial<In, KIND, 1>;
  if (B <= 2) return launch_partial<In, KIND, 2>;
  if (B <= 4) return launch_partial<In, KIND, 4>;
  if (B <= 8) return launch_partial<In, KIND, 8>;
  if (B <= 16) return launch_partial<In, KIND, 16>;
  return launch_partial<In, KIND, 32>;
}

template <typename In>
PartialLauncher pick_kind(int kind, int64_t B) {
  return kind == kRademacher ? pick_tile<In, kRademacher>(B) : pick_tile<In, kGaussian>(B);
}

}  // namespace

cudaError_t jl_project_cuda(const void* x, int dtype, int64_t B, int64_t D, int64_t ldx,
                            float* out, int64_t k, uint64_t seed, int kind, uint64_t offset,
                            float scale, float* ws, int64_t ws_chunks, cudaStream_t stream) {
  PartialLauncher partial = dtype == kFloat32   ? pick_kind<float>(kind, B)
                            : dtype == kFloat16 ? pick_kind<Half>(kind, B)
                                                : pick_kind<BFloat16>(kind, B);
  const int64_t n_chunks = (D + kJlChunk - 1) / kJlChunk;
  const int64_t window = imax(1, imin(ws_chunks, 65535));
  const int64_t size = B * k;
  for (int64_t c0 = 0; c0 < n_chunks; c0 += window) {
    const int64_t chunks = imin(window, n_chunks - c0);
    partial(x, B, D, ldx, k, seed, offset, c0, chunks, ws, stream);
    jl_reduce_kernel<<<static_cast<unsigned>((size + 255) / 256), 256, 0, stream>>>(
        ws, chunks, size, out, scale, c0 == 0, c0 + chunks == n_chunks);
  }
  return cudaGetLastError();
}

}  // namespace fi
