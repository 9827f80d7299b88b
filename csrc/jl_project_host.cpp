// Host twin of the CUDA jl_project kernel: same entries (jl_entries.h), same summation
// order (fma over the rows of each kJlChunk chunk from +0, then the chunk sums added in
// order, then one multiply by scale), hence the same float32 bits. Parallel over tiles of
// (rows of x, columns of R); no tile shares an output, so the thread count does not matter.
#include <algorithm>
#include <cmath>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "fi_convert.h"
#include "host_kernels.h"
#include "jl_entries.h"

// With AVX2 and FMA the Philox words and the multiply-adds use intrinsics; the Gaussian
// transform is compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time.
// Every path rounds once per step, so all give the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FI_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FI_CLONES
#endif

namespace fi {
namespace {

constexpr int kCols = 32;   // columns of R per tile
constexpr int kRows = 32;   // rows of x per tile: R is generated once for all of them
constexpr int kBlock = 128; // rows of R generated at a time (16 KiB: stays in L1)

// The words of block `block` for columns j0 .. j0 + kCols, and for Gaussian R its four
// entries per column; laid out by lane so that the compiler vectorises across columns.
struct BlockWords {
  uint32_t w[4][kCols];
  float gauss[4][kCols];
};

#if defined(__x86_64__)
const bool kHasAvx2Fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");

// Philox4x32-10 (philox.h) for 8 columns at once, one per 32-bit lane: the two 32x32-bit
// products per round come from the even and the odd lanes of _mm256_mul_epu32.
__attribute__((target("avx2"))) inline void mulhilo_avx2(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) void column_words_avx2(uint64_t seed, int kind, uint64_t block, int64_t j0,
                                                       BlockWords* out) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int jj = 0; jj < kCols; jj += 8) {
    __m256i c0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(block)));
    __m256i c1 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(j0 + jj))),
                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i c2 = _mm256_set1_epi32(kind);
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(block >> 32)));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo_avx2(c0, m0, &hi0, &lo0);
      mulhilo_avx2(c2, m1, &hi1, &lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c1 = lo1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c3 = lo0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const __m256i words[4] = {c0, c1, c2, c3};
    for (int i = 0; i < 4; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out->w[i] + jj), words[i]);
  }
}
#endif

void column_words(uint64_t seed, int kind, uint64_t block, int64_t j0, BlockWords* out) {
#if defined(__x86_64__)
  if (kHasAvx2Fma) return column_words_avx2(seed, kind, block, j0, out);
#endif
  for (int jj = 0; jj < kCols; ++jj) {
    const U32x4 w = jl_words(seed, kind, block, static_cast<uint32_t>(j0 + jj));
    out->w[0][jj] = w.x, out->w[1][jj] = w.y, out->w[2][jj] = w.z, out->w[3][jj] = w.w;
  }
}

FI_CLONES void column_gaussians(BlockWords* out) {
  for (int jj = 0; jj < kCols; ++jj)
    jl_box_muller(out->w[0][jj], out->w[1][jj], &out->gauss[0][jj], &out->gauss[1][jj]);
  for (int jj = 0; jj < kCols; ++jj)
    jl_box_muller(out->w[2][jj], out->w[3][jj], &out->gauss[2][jj], &out->gauss[3][jj]);
}

void block_words(uint64_t seed, int kind, uint64_t block, int64_t j0, BlockWords* out) {
  column_words(seed, kind, block, j0, out);
  if (kind == kGaussian) column_gaussians(out);
}

// R[dd * kCols + jj] = entry (gd0 + dd, j0 + jj) for dd < n.
FI_CLONES void fill_entries(uint64_t seed, int kind, uint64_t gd0, int n, int64_t j0, float* R) {
  const int shift = jl_block_shift(kind);
  BlockWords bw;
  uint64_t current = 0;
  for (int dd = 0; dd < n; ++dd) {
    const uint64_t gd = gd0 + static_cast<uint64_t>(dd);
    const uint64_t block = gd >> shift;
    if (dd == 0 || block != current) {
      current = block;
      block_words(seed, kind, block, j0, &bw);
    }
    float* r = R + dd * kCols;
    if (kind == kRademacher) {
      const uint32_t* w = bw.w[(gd >> 5) & 3];
      const uint32_t bit = gd & 31;
      // +-1.0f from the sign bit alone: no branch, so the loop vectorises.
      for (int jj = 0; jj < kCols; ++jj) r[jj] = bits_float(0x3f800000u | (((w[jj] >> bit) & 1u) << 31));
    } else {
      for (int jj = 0; jj < kCols; ++jj) r[jj] = bw.gauss[gd & 3][jj];
    }
  }
}

// part rows (kCols apart) += fma over dd < n of xb rows (kBlock apart) times R[dd], in
// order of dd, one rounding per step. Two rows at a time keep the sums in registers.
template <int RB>
inline void accumulate(const float* x, const float* R, int n, float* acc) {
  float a[RB][kCols];
  for (int rb = 0; rb < RB; ++rb)
    for (int jj = 0; jj < kCols; ++jj) a[rb][jj] = acc[rb * kCols + jj];
  for (int dd = 0; dd < n; ++dd)
    for (int rb = 0; rb < RB; ++rb)
      for (int jj = 0; jj < kCols; ++jj) a[rb][jj] = std::fma(x[rb * kBlock + dd], R[dd * kCols + jj], a[rb][jj]);
  for (int rb = 0; rb < RB; ++rb)
    for (int jj = 0; jj < kCols; ++jj) acc[rb * kCols + jj] = a[rb][jj];
}

#if defined(__x86_64__)
template <int RB>
__attribute__((target("avx2,fma"))) inline void accumulate_avx2(const float* x, const float* R, int n, float* acc) {
  static_assert(kCols == 32, "four 8-wide vectors per row");
  __m256 a[RB][4];
  for (int rb = 0; rb < RB; ++rb)
    for (int v = 0; v < 4; ++v) a[rb][v] = _mm256_loadu_ps(acc + rb * kCols + 8 * v);
  for (int dd = 0; dd < n; ++dd) {
    const float* r = R + dd * kCols;
    const __m256 r0 = _mm256_loadu_ps(r), r1 = _mm256_loadu_ps(r + 8);
    const __m256 r2 = _mm256_loadu_ps(r + 16), r3 = _mm256_loadu_ps(r + 24);
    for (int rb = 0; rb < RB; ++rb) {
      const __m256 xv = _mm256_broadcast_ss(x + rb * kBlock + dd);
      a[rb][0] = _mm256_fmadd_ps(xv, r0, a[rb][0]);
      a[rb][1] = _mm256_fmadd_ps(xv, r1, a[rb][1]);
      a[rb][2] = _mm256_fmadd_ps(xv, r2, a[rb][2]);
      a[rb][3] = _mm256_fmadd_ps(xv, r3, a[rb][3]);
    }
  }
  for (int rb = 0; rb < RB; ++rb)
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(acc + rb * kCols + 8 * v, a[rb][v]);
}

__attribute__((target("avx2,fma"))) void accumulate_rows_avx2(const float* xb, int nb, const float* R, int n,
                                                               float* part) {
  int rb = 0;
  for (; rb + 2 <= nb; rb += 2) accumulate_avx2<2>(xb + rb * kBlock, R, n, part + rb * kCols);
  if (rb < nb) accumulate_avx2<1>(xb + rb * kBlock, R, n, part + rb * kCols);
}
#endif

void accumulate_rows(const float* xb, int nb, const float* R, int n, float* part) {
#if defined(__x86_64__)
  if (kHasAvx2Fma) return accumulate_rows_avx2(xb, nb, R, n, part);
#endif
  int rb = 0;
  for (; rb + 2 <= nb; rb += 2) accumulate<2>(xb + rb * kBlock, R, n, part + rb * kCols);
  if (rb < nb) accumulate<1>(xb + rb * kBlock, R, n, part + rb * kCols);
}

struct Problem {
  int64_t B, D, ldx, k;
  uint64_t seed, offset;
  int kind;
  float scale;
  float* out;
};

template <typename In>
void run_tile(const In* x, const Problem& p, int64_t b0, int nb, int64_t j0, int nj) {
  float R[kBlock * kCols];
  float xb[kRows * kBlock];
  float part[kRows * kCols];
  float total[kRows * kCols];
  std::fill(total, total + kRows * kCols, 0.0f);
  for (int64_t c0 = 0; c0 < p.D; c0 += kJlChunk) {
    const int64_t c1 = std::min(p.D, c0 + kJlChunk);
    std::fill(part, part + kRows * kCols, 0.0f);
    for (int64_t d0 = c0; d0 < c1; d0 += kBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, c1 - d0));
      fill_entries(p.seed, p.kind, p.offset + static_cast<uint64_t>(d0), n, j0, R);
      for (int rb = 0; rb < nb; ++rb) {
        const In* row = x + (b0 + rb) * p.ldx + d0;
        for (int dd = 0; dd < n; ++dd) xb[rb * kBlock + dd] = to_float(row[dd]);
      }
      accumulate_rows(xb, nb, R, n, part);
    }
    for (int i = 0; i < nb * kCols; ++i) total[i] = total[i] + part[i];
  }
  for (int rb = 0; rb < nb; ++rb)
    for (int jj = 0; jj < nj; ++jj)
      p.out[(b0 + rb) * p.k + j0 + jj] = total[rb * kCols + jj] * p.scale;
}

template <typename In>
void run(const In* x, const Problem& p, int num_threads) {
  const int64_t col_tiles = (p.k + kCols - 1) / kCols;
  const int64_t row_tiles = (p.B + kRows - 1) / kRows;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t t = 0; t < col_tiles * row_tiles; ++t) {
    const int64_t j0 = (t % col_tiles) * kCols, b0 = (t / col_tiles) * kRows;
    run_tile(x, p, b0, static_cast<int>(std::min<int64_t>(kRows, p.B - b0)), j0,
             static_cast<int>(std::min<int64_t>(kCols, p.k - j0)));
  }
}

}  // namespace

void jl_project_host(const void* x, int dtype, int64_t B, int64_t D, int64_t ldx, float* out,
                     int64_t k, uint64_t seed, int kind, uint64_t offset, float scale,
                     int num_threads) {
  const Problem p{B, D, ldx, k, seed, offset, kind, scale, out};
  switch (dtype) {
    case kFloat32: return run(static_cast<const float*>(x), p, num_threads);
    case kFloat16: return run(static_cast<const Half*>(x), p, num_threads);
    case kBFloat16: return run(static_cast<const BFloat16*>(x), p, num_threads);
  }
}

}  // namespace fi
