// CUDA top-k selection: one warp per query row keeps the row's top-k sorted in shared
// memory. Candidates arrive 32 at a time (coalesced); a ballot keeps those that beat the
// current k-th entry, and each survivor is inserted by the whole warp (count the entries
// before it, shift the tail by one). Order and ties follow topk_order.h, as the host twin.
#include "cuda_kernels.h"
#include "topk_order.h"

namespace fi {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__global__ void __launch_bounds__(32)
    topk_warp_kernel(const T* __restrict__ S, int64_t n, int64_t lds, int64_t index_offset,
                     const T* __restrict__ prev_values, const int64_t* __restrict__ prev_indices,
                     int64_t kp, int64_t k_out, T* __restrict__ values, int64_t* __restrict__ indices) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* top_i = reinterpret_cast<int64_t*>(smem);
  T* top_v = reinterpret_cast<T*>(smem + k_out * sizeof(int64_t));
  const int64_t q = blockIdx.x;
  const int lane = threadIdx.x;
  const int64_t m = kp + n;
  int64_t count = 0;  // entries held, identical in every lane

  for (int64_t base = 0; base < m; base += 32) {
    const int64_t c = base + lane;
    bool have = c < m;
    T v = T(0);
    int64_t idx = 0;
    if (have && c < kp) {
      v = prev_values[q * kp + c];
      idx = prev_indices[q * kp + c];
    } else if (have) {
      v = S[q * lds + (c - kp)];
      idx = index_offset + (c - kp);
    }
    while (true) {
      const bool full = count == k_out;
      const bool pass = have && (!full || topk_before(v, idx, top_v[k_out - 1], top_i[k_out - 1]));
      const unsigned mask = __ballot_sync(kFullMask, pass);
      if (mask == 0) break;
      const int src = __ffs(mask) - 1;
      const T cv = __shfl_sync(kFullMask, v, src);
      const int64_t ci = __shfl_sync(kFullMask, idx, src);
      int before = 0;
      for (int64_t i = lane; i < count; i += 32) before += topk_before(top_v[i], top_i[i], cv, ci);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) before += __shfl_xor_sync(kFullMask, before, o);
      const int64_t pos = before;
      // Move [pos, hi) to [pos + 1, hi + 1), highest block first; the last entry drops out when full.
      for (int64_t hi = imin(count, k_out - 1); hi > pos; hi -= 32) {
        const int64_t i = imax(pos, hi - 32) + lane;
        const bool moves = i < hi;
        T tv = T(0);
        int64_t ti = 0;
        if (moves) tv = top_v[i], ti = top_i[i];
        __syncwarp();
        if (moves) top_v[i + 1] = tv, top_i[i + 1] = ti;
        __syncwarp();
      }
      if (lane == 0) top_v[pos] = cv, top_i[pos] = ci;
      __syncwarp();
      count = imin(count + 1, k_out);
      if (lane == src) have = false;
    }
  }
  for (int64_t i = lane; i < k_out; i += 32) {
    values[q * k_out + i] = top_v[i];
    indices[q * k_out + i] = top_i[i];
  }
}

}  // namespace

template <typename T>
cudaError_t topk_merge_cuda(const T* S, int64_t Q, int64_t n, int64_t lds, int64_t index_offset,
                            const T* prev_values, const int64_t* prev_indices, int64_t kp,
                            int64_t k_out, T* values, int64_t* indices, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(k_out) * (sizeof(int64_t) + sizeof(T));
  topk_warp_kernel<T><<<static_cast<unsigned>(Q), 32, smem, stream>>>(
      S, n, lds, index_offset, prev_values, prev_indices, kp, k_out, values, indices);
  return cudaGetLastError();
}

template cudaError_t topk_merge_cuda<float>(const float*, int64_t, int64_t, int64_t, int64_t,
                                            const float*, const int64_t*, int64_t, int64_t,
                                            float*, int64_t*, cudaStream_t);
template cudaError_t topk_merge_cuda<double>(const double*, int64_t, int64_t, int64_t, int64_t,
                                             const double*, const int64_t*, int64_t, int64_t,
                                             double*, int64_t*, cudaStream_t);

}  // namespace fi
