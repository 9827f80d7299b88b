// The order of a per-row top-k, shared by the host and device selection kernels so that
// both match the torch reference (fastinfluence/ops/score_topk.py) exactly: larger value
// first, NaN above every number (as torch.sort), equal values by lower index.
#pragma once

#include "fi_common.h"

namespace fi {

template <typename T>
FI_HD bool topk_before(T va, int64_t ia, T vb, int64_t ib) {
  const bool nan_a = va != va, nan_b = vb != vb;
  if (nan_a || nan_b) return nan_a && (!nan_b || ia < ib);
  if (va != vb) return va > vb;
  return ia < ib;
}

}  // namespace fi
