// CUDA project: phi_b = sum_t (g_t P_out)^T (a_t P_in) on the tensor cores (WMMA).
//
// One CTA per (example, token split). Its work is a flat sequence of steps: for every
// tile of 64 tokens, ceil(d_in / BD) steps over A then ceil(d_out / BD) over G, each step
// a (64 x BD) tile of X and the (BD x kp) rows of P. A three-stage cp.async pipeline
// keeps two steps in flight across side and tile boundaries, so A and G stream without a
// pause. Each warp owns a 16-row band and kp/32 column tiles of X P in WMMA accumulators
// (bf16/fp16 operands, or TF32 for float32 inputs; float32 accumulation). At the end of a
// side the 64 x kp float32 result goes to shared memory; at the end of a tile phi +=
// G~^T A~ runs on the FMA units in float32 (under 1% of the work), skipping masked
// tokens, so NaN in padding never reaches phi. Splits write partial phi; the caller adds
// them in split order. A~ and G~ never leave the chip.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

#include "fi_common.h"
#include "project.h"

namespace fi {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStages = 3;
constexpr int kTile = kProjectTokenTile;
constexpr int kRowBands = kTile / 16;             // 16-row bands of a token tile
constexpr int kColGroups = kWarps / kRowBands;    // warps sharing one band
static_assert(kWarps % kRowBands == 0, "warps must cover the row bands evenly");

// WMMA shapes and fragments per operand type (float32 inputs run as TF32).
template <typename E>
struct Mma;

template <>
struct Mma<__half> {
  static constexpr int kK = 16;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  template <typename F>
  __device__ static void round(F&) {}
};

template <>
struct Mma<__nv_bfloat16> {
  static constexpr int kK = 16;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  template <typename F>
  __device__ static void round(F&) {}
};

template <>
struct Mma<float> {
  static constexpr int kK = 8;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  template <typename F>
  __device__ static void round(F& f) {
#pragma unroll
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
  }
};

// Shared-memory layout for operand type E and padded rank KP. Rows of the X tile are 128
// bytes (BD elements) plus one 16-byte chunk of padding against bank conflicts; every
// WMMA pointer stays 32-byte aligned and every cp.async destination 16-byte aligned.
template <typename E, int KP>
struct Layout {
  static constexpr int kChunk = 16 / static_cast<int>(sizeof(E));  // elements per 16 bytes
  static constexpr int kBD = 8 * kChunk;                            // d per step
  static constexpr int kLdx = kBD + kChunk;
  static constexpr int kLdp = KP + kChunk;
  static constexpr int kLdo = KP + 4;  // float32 rows of A~ and G~
  static constexpr int kStageElems = kTile * kLdx + kBD * kLdp;
  static constexpr size_t kStageBytes = static_cast<size_t>(kStageElems) * sizeof(E);
  static constexpr size_t kOutBytes = static_cast<size_t>(kTile) * kLdo * sizeof(float);
  static constexpr size_t kSmem = kStages * kStageBytes + 2 * kOutBytes + KP * sizeof(float) + kTile * sizeof(int);
  static constexpr int kFrags = KP / 16 / kColGroups;  // accumulator tiles per warp
  static constexpr int kPhi = KP / 16;                 // phi rows (and columns) per thread
  static_assert(kStageBytes % 128 == 0 && kOutBytes % 128 == 0, "regions must stay 128-byte aligned");
  static_assert(kFrags >= 1, "the rank tile must give every warp a column tile");
};

template <typename E>
using RawBits = typename std::conditional<sizeof(E) == 2, uint16_t, uint32_t>::type;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Stage one step: X[b, t0 : t0 + 64, d0 : d0 + BD] and P[d0 : d0 + BD, :], zero outside
// the tokens [.., t_end) and the rows [.., d). Tokens outside the range are never read.
template <typename E, int KP>
__device__ __forceinline__ void load_step(E* xs, E* ps, const ProjectSide& side, int64_t b, int64_t t0,
                                          int64_t t_end, int64_t d0) {
  using L = Layout<E, KP>;
  using Raw = RawBits<E>;
  constexpr int kRowChunks = L::kBD / L::kChunk;
  const E* x = static_cast<const E*>(side.x) + b * side.stride_b;
  for (int c = threadIdx.x; c < kTile * kRowChunks; c += kThreads) {
    const int r = c / kRowChunks;
    const int64_t t = t0 + r;
    const int64_t col = d0 + (c % kRowChunks) * L::kChunk;
    E* dst = xs + r * L::kLdx + (c % kRowChunks) * L::kChunk;
    if (side.vec) {
      const bool ok = t < t_end && col < side.d;
      cp_async16(dst, ok ? static_cast<const void*>(x + t * side.stride_t + col) : side.x, ok ? 16 : 0);
    } else {
      const Raw* src = reinterpret_cast<const Raw*>(x) + (t < t_end ? t * side.stride_t : 0);
#pragma unroll
      for (int e = 0; e < L::kChunk; ++e)
        reinterpret_cast<Raw*>(dst)[e] = (t < t_end && col + e < side.d) ? src[col + e] : Raw(0);
    }
  }
  constexpr int kPChunks = KP / L::kChunk;
  const E* p = static_cast<const E*>(side.p);
  for (int c = threadIdx.x; c < L::kBD * kPChunks; c += kThreads) {
    const int r = c / kPChunks;
    const int col = (c % kPChunks) * L::kChunk;
    const bool ok = d0 + r < side.d;
    cp_async16(ps + r * L::kLdp + col, ok ? static_cast<const void*>(p + (d0 + r) * KP + col) : side.p, ok ? 16 : 0);
  }
}

// Position in a CTA's flat sequence of steps, advanced one step at a time (no division).
struct Cursor {
  int64_t tile, step;
  __device__ void advance(int64_t per_tile) {
    if (++step == per_tile) step = 0, ++tile;
  }
};

template <typename E, int KP>
__global__ void __launch_bounds__(kThreads, KP <= 64 ? 2 : 1) project_kernel(ProjectArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using L = Layout<E, KP>;
  using M = Mma<E>;
  extern __shared__ __align__(128) unsigned char smem[];
  E* stages = reinterpret_cast<E*>(smem);
  float* at = reinterpret_cast<float*>(smem + kStages * L::kStageBytes);
  float* gt = at + kTile * L::kLdo;
  float* bias = gt + kTile * L::kLdo;  // (KP,) bias row of P_in, zero when none
  int* row_ok = reinterpret_cast<int*>(bias + KP);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int64_t b = blockIdx.x;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * args.tokens_per_split;
  const int64_t t_end = imin(args.T, t_begin + args.tokens_per_split);
  const int64_t n_a = (args.a.d + L::kBD - 1) / L::kBD;
  const int64_t per_tile = n_a + (args.g.d + L::kBD - 1) / L::kBD;
  const int64_t n_steps = imax(0, (t_end - t_begin + kTile - 1) / kTile) * per_tile;

  auto stage = [&](int64_t s) { return stages + (s % kStages) * L::kStageElems; };
  Cursor next_load{0, 0};  // (token tile, step within it) of the next step to stage
  auto issue = [&](int64_t s) {
    if (s < n_steps) {
      const int64_t r = next_load.step;
      const int64_t t0 = t_begin + next_load.tile * kTile;
      E* xs = stage(s);
      if (r < n_a)
        load_step<E, KP>(xs, xs + kTile * L::kLdx, args.a, b, t0, t_end, r * L::kBD);
      else
        load_step<E, KP>(xs, xs + kTile * L::kLdx, args.g, b, t0, t_end, (r - n_a) * L::kBD);
      next_load.advance(per_tile);
    }
    cp_async_commit();  // empty groups past the end keep the wait count uniform
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);
  Cursor now{0, 0};

  const int band = warp % kRowBands;
  const int col0 = (warp / kRowBands) * L::kFrags;
  typename M::Acc acc[L::kFrags];
#pragma unroll
  for (int j = 0; j < L::kFrags; ++j) wmma::fill_fragment(acc[j], 0.0f);

  for (int i = tid; i < KP; i += kThreads) bias[i] = args.bias != nullptr && i < args.k_in ? args.bias[i] : 0.0f;
  const int ty = tid / 16, tx = tid % 16;
  float phi[L::kPhi][L::kPhi];
#pragma unroll
  for (int m = 0; m < L::kPhi; ++m)
#pragma unroll
    for (int n = 0; n < L::kPhi; ++n) phi[m][n] = 0.0f;

  for (int64_t s = 0; s < n_steps; ++s) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // step s is staged for all; the stage refilled below was consumed at s - 1
    issue(s + kStages - 1);

    const E* xs = stage(s);
    const E* ps = xs + kTile * L::kLdx;
#pragma unroll
    for (int kk = 0; kk < L::kBD; kk += M::kK) {
      typename M::FragA fa;
      wmma::load_matrix_sync(fa, xs + band * 16 * L::kLdx + kk, L::kLdx);
      M::round(fa);
#pragma unroll
      for (int j = 0; j < L::kFrags; ++j) {
        typename M::FragB fb;
        wmma::load_matrix_sync(fb, ps + kk * L::kLdp + (col0 + j) * 16, L::kLdp);
        M::round(fb);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }

    const int64_t r = now.step;
    const int64_t tile = now.tile;
    now.advance(per_tile);
    if (r != n_a - 1 && r != per_tile - 1) continue;
    float* out = r == n_a - 1 ? at : gt;  // the side just finished
#pragma unroll
    for (int j = 0; j < L::kFrags; ++j) {
      wmma::store_matrix_sync(out + band * 16 * L::kLdo + (col0 + j) * 16, acc[j], L::kLdo, wmma::mem_row_major);
      wmma::fill_fragment(acc[j], 0.0f);
    }
    if (r != per_tile - 1) continue;

    // End of a token tile: phi += G~^T (A~ + bias) over the tokens that count.
    if (tid < kTile) {
      const int64_t t = t_begin + tile * kTile + tid;
      row_ok[tid] = t < t_end && (args.mask == nullptr || args.mask[b * args.mask_sb + t * args.mask_st] != 0);
    }
    __syncthreads();
#pragma unroll 1
    for (int t = 0; t < kTile; ++t) {
      if (!row_ok[t]) continue;  // select, not multiply: NaN in masked rows stays out
      float gv[L::kPhi], av[L::kPhi];
#pragma unroll
      for (int m = 0; m < L::kPhi; ++m) {
        gv[m] = gt[t * L::kLdo + ty + 16 * m];
        av[m] = at[t * L::kLdo + tx + 16 * m] + bias[tx + 16 * m];
      }
#pragma unroll
      for (int m = 0; m < L::kPhi; ++m)
#pragma unroll
        for (int n = 0; n < L::kPhi; ++n) phi[m][n] = fmaf(gv[m], av[n], phi[m][n]);
    }
  }

  float* out = args.partial + (static_cast<int64_t>(blockIdx.y) * args.B + b) * args.k_out * args.k_in;
#pragma unroll
  for (int m = 0; m < L::kPhi; ++m) {
    const int o = ty + 16 * m;
#pragma unroll
    for (int n = 0; n < L::kPhi; ++n) {
      const int i = tx + 16 * n;
      if (o < args.k_out && i < args.k_in) out[o * args.k_in + i] = phi[m][n];
    }
  }
#else
  __trap();  // cp.async and bf16/TF32 WMMA need compute capability 8.0
#endif
}

template <typename E, int KP>
cudaError_t launch(const ProjectArgs& args, int64_t splits, cudaStream_t stream) {
  constexpr size_t smem = Layout<E, KP>::kSmem;
  const cudaError_t err =
      cudaFuncSetAttribute(project_kernel<E, KP>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(args.B), static_cast<unsigned>(splits));
  project_kernel<E, KP><<<grid, kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <typename E>
cudaError_t launch_rank(const ProjectArgs& args, int kp, int64_t splits, cudaStream_t stream) {
  switch (kp) {
    case 32: return launch<E, 32>(args, splits, stream);
    case 64: return launch<E, 64>(args, splits, stream);
    case 128: return launch<E, 128>(args, splits, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t project_cuda(const ProjectArgs& args, int dtype, int kp, int64_t splits, cudaStream_t stream) {
  if (args.B <= 0 || splits <= 0 || splits > 65535 || args.B > 0x7fffffff) return cudaErrorInvalidValue;
  switch (dtype) {
    case kFloat32: return launch_rank<float>(args, kp, splits, stream);
    case kFloat16: return launch_rank<__half>(args, kp, splits, stream);
    case kBFloat16: return launch_rank<__nv_bfloat16>(args, kp, splits, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fi
