// Lookahead (Zhang et al. 2019, arXiv 1907.08610), docs/spec.md §5, one element of the sync.
#pragma once

#include "common.h"

namespace fused_optim {
namespace math {

template <typename M>
struct LookaheadCoeffs {
  M alpha;
  M one_minus_alpha;  // 1 - alpha, rounded from the double like the reference's scalar
  explicit LookaheadCoeffs(double alpha_)
      : alpha(static_cast<M>(alpha_)), one_minus_alpha(static_cast<M>(1.0 - alpha_)) {}
};

// p.mul_(alpha).add_(slow, alpha=1-alpha): torch's add(alpha=) is one fma on the CPU. The kernels
// then store p and set slow to the STORED p (slow.copy_(p): for bf16/fp16 params with fp32 slow
// weights, the param's rounded value, as the reference's copy).
template <typename T, typename M>
C10_HOST_DEVICE inline T lookahead_interpolate(const T& p, const T& slow, const LookaheadCoeffs<M>& c) {
  return fo_fma(slow, T(c.one_minus_alpha), p * T(c.alpha));
}

}  // namespace math
}  // namespace fused_optim
