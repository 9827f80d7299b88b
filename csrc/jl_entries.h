// The random matrix R (D x k) of jl_project, defined entry by entry.
//
// Entry (d, j) depends on (seed, kind, d, j) only: one Philox4x32-10 call with
//   counter = (block lo32, j, kind, block hi32), key = (seed lo32, seed hi32)
// yields 128 bits shared by the rows of one block of column j:
//   rademacher: block = d >> 7; entry = bit (d mod 128) of the words ? -1 : +1
//   gaussian:   block = d >> 2; the four words give four N(0, 1) values by Box-Muller
//               (words 0, 1 -> rows 4b, 4b+1; words 2, 3 -> rows 4b+2, 4b+3).
// Box-Muller uses only correctly rounded +, -, *, / and sqrt (polynomials for log, sin
// and cos), so g++, nvcc and the vectorised torch reference agree bit for bit.
// jl_project scales R by 1/sqrt(k) so that E[<Px, Py>] = <x, y>.
#pragma once

#include "philox.h"

namespace fi {

enum JlKind : int { kRademacher = 0, kGaussian = 1 };

// Rows of x summed into one partial sum; the partials are then added in order. Fixing
// this split (instead of one tied to the thread or SM count) makes every device produce
// the same float32 result.
constexpr int64_t kJlChunk = 1024;

FI_HD int jl_block_shift(int kind) { return kind == kRademacher ? 7 : 2; }

FI_HD U32x4 jl_words(uint64_t seed, int kind, uint64_t block, uint32_t j) {
  const U32x4 ctr{static_cast<uint32_t>(block), j, static_cast<uint32_t>(kind),
                  static_cast<uint32_t>(block >> 32)};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

FI_HD float jl_rademacher(const U32x4& words, uint64_t d) {
  const uint32_t bit = (pick(words, static_cast<uint32_t>(d >> 5) & 3u) >> (d & 31)) & 1u;
  return bit ? -1.0f : 1.0f;
}

// ln(u) for u in [2^-24, 1): u = m 2^e with m in [sqrt(1/2), sqrt(2)], and
// ln m = 2 atanh(s) with s = (m - 1) / (m + 1), |s| < 0.172 (series to s^9).
FI_HD float jl_log(float u) {
  const uint32_t b = float_bits(u);
  int e = static_cast<int>(b >> 23) - 127;
  float m = bits_float((b & 0x7fffffu) | 0x3f800000u);
  // Selects of values computed either way, not branches, so the host loop vectorises.
  const bool big = m > 0x1.6a09e6p+0f;
  const float half_m = mul_rn(m, 0.5f);
  m = big ? half_m : m;
  e += big ? 1 : 0;
  const float s = div_rn(sub_rn(m, 1.0f), add_rn(m, 1.0f));
  const float s2 = mul_rn(s, s);
  float p = mul_rn(s2, 0x1.c71c72p-4f);  // 1/9
  p = mul_rn(s2, add_rn(0x1.24924ap-3f, p));  // 1/7
  p = mul_rn(s2, add_rn(0x1.99999ap-3f, p));  // 1/5
  p = add_rn(0x1.555556p-2f, p);  // 1/3
  const float two_s = mul_rn(s, 2.0f);
  const float ln_m = add_rn(two_s, mul_rn(mul_rn(two_s, s2), p));
  return add_rn(mul_rn(static_cast<float>(e), 0x1.62e430p-1f), ln_m);  // e ln 2 + ln m
}

// sin and cos of t in (0, pi/2) by their Taylor series (error < 6e-8).
FI_HD void jl_sincos(float t, float* s, float* c) {
  const float t2 = mul_rn(t, t);
  float ps = mul_rn(t2, -0x1.ae6456p-26f);  // -1/11!
  ps = mul_rn(t2, add_rn(0x1.71de3ap-19f, ps));  // 1/9!
  ps = mul_rn(t2, add_rn(-0x1.a01a02p-13f, ps));  // -1/7!
  ps = mul_rn(t2, add_rn(0x1.111112p-7f, ps));  // 1/5!
  ps = mul_rn(t2, add_rn(-0x1.555556p-3f, ps));  // -1/3!
  *s = add_rn(t, mul_rn(t, ps));
  float pc = mul_rn(t2, 0x1.1eed8ep-29f);  // 1/12!
  pc = mul_rn(t2, add_rn(-0x1.27e4fcp-22f, pc));  // -1/10!
  pc = mul_rn(t2, add_rn(0x1.a01a02p-16f, pc));  // 1/8!
  pc = mul_rn(t2, add_rn(-0x1.6c16c2p-10f, pc));  // -1/6!
  pc = mul_rn(t2, add_rn(0x1.555556p-5f, pc));  // 1/4!
  pc = mul_rn(t2, add_rn(-0.5f, pc));  // -1/2!
  *c = add_rn(1.0f, pc);
}

// Two N(0, 1) values from two 32-bit words (Box-Muller): radius from u1 = a, angle from b.
FI_HD void jl_box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float u1 = mul_rn(static_cast<float>(((a >> 9) << 1) | 1u), 0x1p-24f);  // (0, 1), exact
  const float r = sqrt_rn(mul_rn(jl_log(u1), -2.0f));
  const uint32_t n = b >> 8;  // 24 bits: 2 for the quadrant, 22 for the angle inside it
  const float f = mul_rn(static_cast<float>(((n & 0x3fffffu) << 1) | 1u), 0x1p-23f);
  float s, c;
  jl_sincos(mul_rn(f, 0x1.921fb6p+0f), &s, &c);  // f * pi/2
  // Rotate (c, s) by q quarter turns: (c, s), (-s, c), (-c, -s), (s, -c).
  const uint32_t q = n >> 22;
  const float cq = (q & 1) ? s : c;
  const float sq = (q & 1) ? c : s;
  const uint32_t cos_sign = ((q + 1) >> 1 & 1u) << 31, sin_sign = (q >> 1) << 31;
  *z0 = mul_rn(r, bits_float(float_bits(cq) ^ cos_sign));
  *z1 = mul_rn(r, bits_float(float_bits(sq) ^ sin_sign));
}

// The four Gaussian entries of one block (rows 4 block .. 4 block + 3).
FI_HD void jl_gaussian4(const U32x4& words, float g[4]) {
  jl_box_muller(words.x, words.y, &g[0], &g[1]);
  jl_box_muller(words.z, words.w, &g[2], &g[3]);
}

}  // namespace fi
