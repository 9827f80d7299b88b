// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011).
// A counter-based generator: the output is a pure function of (counter, key), so any
// thread on any device computes any entry of a random matrix without shared state.
#pragma once

#include "fi_common.h"

namespace fi {

struct U32x4 {
  uint32_t x, y, z, w;
};

FI_HD uint32_t pick(const U32x4& v, uint32_t i) {
  // A select, not v[i]: a dynamic index would push the words to local memory on the GPU.
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

FI_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// Multipliers and key increments (Weyl constants) of Philox4x32.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

FI_HD U32x4 philox4x32_10(U32x4 ctr, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, ctr.x, &hi0, &lo0);
    mulhilo32(kPhiloxM1, ctr.z, &hi1, &lo1);
    ctr = U32x4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return ctr;
}

}  // namespace fi
