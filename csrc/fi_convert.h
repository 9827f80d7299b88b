// Element loads of the input dtypes as float32 (exact for float16 and bfloat16).
#pragma once

#include "fi_common.h"

namespace fi {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

FI_HD float to_float(float v) { return v; }

FI_HD float to_float(BFloat16 v) { return bits_float(static_cast<uint32_t>(v.bits) << 16); }

FI_HD float to_float(Half v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1fu;
  const uint32_t mantissa = v.bits & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, nan
  if (exponent == 0) {  // zero and subnormals: mantissa * 2^-24, exact in float
    const float f = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -f : f;
  }
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

}  // namespace fi
