// Gravity (Bahrami & Zadeh 2021, arXiv 2101.09192), docs/spec.md §1, one element.
#pragma once

#include "common.h"

namespace fused_optim {
namespace math {

template <typename M>
struct GravityCoeffs {
  M lr;
  M beta_hat;
  M one_minus_beta_hat;  // 1 - beta_hat, rounded from the double like the reference's scalar
  GravityCoeffs(double lr_, double beta_hat_)
      : lr(static_cast<M>(lr_)), beta_hat(static_cast<M>(beta_hat_)),
        one_minus_beta_hat(static_cast<M>(1.0 - beta_hat_)) {}
  // values read from tensors (capturable): 1 - beta_hat in the math type, as the Triton kernel
  // computes it with BETA_HAT_TENSOR
  C10_HOST_DEVICE void set_lr(M lr_) { lr = lr_; }
  C10_HOST_DEVICE void set_beta_hat(M beta_hat_) {
    beta_hat = beta_hat_;
    one_minus_beta_hat = M(1) - beta_hat_;
  }
};

// m = 1 / max|g| of the tensor, computed once per tensor from the reduction buffer.
template <typename M>
C10_HOST_DEVICE inline M gravity_m(M absmax) {
  return M(1) / absmax;  // 1/0 = inf: then g/m = 0 and zeta = 0, no NaN (docs/spec.md §1)
}

template <typename T, typename M>
C10_HOST_DEVICE inline void gravity_update(T& p, const T& g, T& v, M m, const GravityCoeffs<M>& c) {
  T r = g / T(m);                                   // reciprocal, divide, square, add 1, divide
  r = r * r;
  r = r + T(1);
  T zeta = g / r;
  v = v * T(c.beta_hat) + T(c.one_minus_beta_hat) * zeta;  // v.mul_(b).add_((1-b)*zeta)
  p = p - T(c.lr) * v;                                // p.sub_(lr * v)
}

}  // namespace math
}  // namespace fused_optim
